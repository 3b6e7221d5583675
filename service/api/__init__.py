"""Protocol adapters: protobuf in, core call, protobuf out. No logic beyond conversion."""

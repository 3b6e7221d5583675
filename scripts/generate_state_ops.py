"""Regenerate the small ONNX graphs that move device-resident state (service/state_ops/).

    python scripts/generate_state_ops.py          # write
    python scripts/generate_state_ops.py --check  # exit 1 if the committed graphs are out of date

With ``state_residency=device`` a model's state arrays live in onnxruntime OrtValues on the
model's device; these graphs, run by onnxruntime on the same device, pick a batch's rows out of
them, write rows back in place, and grow them (service/state_bank.py). They are built here with
the ``onnx`` package (a training/test dependency) so that the serving path needs only
onnxruntime. Every graph works on one float32 tensor of shape [layers, rows, hidden] (a state as stored:
[pre, rows, post], service/signature.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "service" / "state_ops"
OPSET = 17
IR_VERSION = 8  # onnxruntime >= 1.20 reads it


def graphs() -> dict[str, bytes]:
    """Every state graph's file name and serialized model."""
    from onnx import TensorProto, helper

    def value(name: str, kind: int, shape: list[str | int]) -> object:
        return helper.make_tensor_value_info(name, kind, shape)

    def model(name: str, nodes: list[object], inputs: list[object], outputs: list[object]) -> bytes:
        graph = helper.make_graph(nodes, name, inputs, outputs)
        proto = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name="rnnserve scripts/generate_state_ops.py",
        )
        return bytes(proto.SerializeToString(deterministic=True))

    states = value("states", TensorProto.FLOAT, ["layers", "capacity", "hidden"])
    gather_rows = model(
        "gather_rows",  # picked[:, i, :] = states[:, rows[i], :] where keep[0, i, 0], else fill
        [
            helper.make_node("Gather", ["states", "rows"], ["gathered"], axis=1),
            helper.make_node("Where", ["keep", "gathered", "fill"], ["picked"]),
        ],
        [
            states,
            value("rows", TensorProto.INT64, ["rows"]),
            value("keep", TensorProto.BOOL, [1, "rows", 1]),
            value("fill", TensorProto.FLOAT, ["fill_layers", 1, "fill_hidden"]),  # broadcast
        ],
        [value("picked", TensorProto.FLOAT, ["layers", "rows", "hidden"])],
    )
    scatter_rows = model(
        "scatter_rows",  # written = states with written[l, i, :] = updates[l, k, :], index[l, k] = (l, i)
        [helper.make_node("ScatterND", ["states", "index", "updates"], ["written"])],
        [
            states,
            value("index", TensorProto.INT64, ["layers", "rows", 2]),
            value("updates", TensorProto.FLOAT, ["layers", "rows", "hidden"]),
        ],
        [value("written", TensorProto.FLOAT, ["layers", "capacity", "hidden"])],
    )
    grow_rows = model(
        "grow_rows",  # grown = states followed by zero rows; pads = [0, 0, 0, 0, extra, 0]
        [helper.make_node("Pad", ["states", "pads"], ["grown"], mode="constant")],
        [states, value("pads", TensorProto.INT64, [6])],
        [value("grown", TensorProto.FLOAT, ["layers", "grown_capacity", "hidden"])],
    )
    return {
        "gather_rows.onnx": gather_rows,
        "scatter_rows.onnx": scatter_rows,
        "grow_rows.onnx": grow_rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the files are out of date")
    args = parser.parse_args()
    wanted = graphs()
    if args.check:
        stale = [n for n, data in wanted.items() if not (OUTPUT / n).is_file()
                 or (OUTPUT / n).read_bytes() != data]  # fmt: skip
        if stale:
            print(f"out of date: {', '.join(stale)}; run python scripts/generate_state_ops.py")
            return 1
        print("service/state_ops is up to date")
        return 0
    OUTPUT.mkdir(exist_ok=True)
    for name, data in wanted.items():
        (OUTPUT / name).write_bytes(data)
    print(f"wrote {len(wanted)} graphs to {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

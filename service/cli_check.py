"""``rnnserve check PATH``: the server's load checks, offline, one line per model version."""

from __future__ import annotations

from pathlib import Path

from service.errors import ModelContractError
from service.model_check import open_model
from service.repository import discover, no_models, read_serving_config
from service.runtime import ProviderUnavailable
from service.settings import Settings


def check_repository(path: Path) -> int:
    """Every model under ``path`` (a repository, or one version folder) through the server's load
    checks, each with its model's serving.json (checked first: an invalid one fails its whole
    model); prints a line per version and a total; the exit status (1 if anything failed)."""
    one = (path / "model.onnx").is_file()
    try:
        directories = [path] if one else discover(path)
    except ModelContractError as error:
        print(f"FAIL {error}")
        return 1
    if not directories:
        print(f"FAIL {no_models(path)}")
        return 1
    settings = Settings(model_repository=path.parent.parent if one else path)
    failed = 0
    models: dict[Path, list[Path]] = {}
    for directory in directories:
        models.setdefault(directory.parent, []).append(directory)
    for folder, versions in models.items():
        try:
            config = read_serving_config(folder)
        except ModelContractError as error:
            failed += len(versions)
            print(f"FAIL {error}")
            continue
        served = config.version_policy.select(v.name for v in versions)
        if not served:
            failed += len(versions)
            present = ", ".join(sorted(v.name for v in versions))
            print(
                f"FAIL model {folder.name}: its version_policy ({config.version_policy}) selects "
                f"none of its versions ({present}); fix serving.json or add the version"
            )
            continue
        own = dict(config.settings)
        for directory in versions:
            try:
                spec, _ = open_model(directory, settings.for_model(own))
            except ModelContractError as error:
                failed += 1
                print(f"FAIL {error}")
                continue
            except ProviderUnavailable as error:  # its serving.json asks for a missing one
                failed += 1
                print(f"FAIL model {directory.parent.name}/{directory.name}: {error}")
                continue
            notes = [f"{k}={v}" for k, v in own.items()]
            if directory.name not in served:
                notes.append(f"not served: outside the version policy ({config.version_policy})")
            extra = f" ({'; '.join(notes)})" if notes else ""
            print(
                f"ok   {spec.label}: {spec.cell}, {spec.num_layers} layer(s) of "
                f"{spec.hidden_size}{extra}"
            )
    print(f"{len(directories) - failed} of {len(directories)} model(s) pass")
    return 1 if failed else 0

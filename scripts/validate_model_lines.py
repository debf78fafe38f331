"""Validate model-line files outside Airflow, exactly as the DAG factory does; or export their JSON Schema.

    python scripts/validate_model_lines.py                      # include/model_lines
    python scripts/validate_model_lines.py path/to/lines a.yaml # folders (with cross-file checks) and files
    python scripts/validate_model_lines.py --include ../ml/include path/to/lines
    python scripts/validate_model_lines.py --json-schema model-line.schema.json

Exit status 0 when every file is valid and its DAG builds, 1 otherwise (for the CI of the repository that
holds the YAML files). ``--include`` is the folder that SQL and entrypoint paths are relative to.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="model-line folders or files (default: the shipped ones)")
    parser.add_argument("--include", type=Path, help="the include/ folder that sql and entrypoint paths are under")
    parser.add_argument("--json-schema", metavar="FILE", help="write the model-line JSON Schema ('-': stdout)")
    args = parser.parse_args(argv)
    if args.include:
        os.environ["MLOPS_INCLUDE_DIR"] = str(args.include.resolve())

    from mlops_lifecycle import paths
    from mlops_lifecycle.config import ModelLineConfig, load_model_line, load_model_lines
    from mlops_lifecycle.exceptions import ModelLineConfigError

    if args.json_schema:
        schema = ModelLineConfig.model_json_schema()
        schema["title"] = "Model line (include/model_lines/<name>.yaml)"
        text = json.dumps(schema, indent=2) + "\n"
        if args.json_schema == "-":
            sys.stdout.write(text)
        else:
            Path(args.json_schema).write_text(text)
            print(f"JSON Schema written to {args.json_schema}")
        return 0

    from mlops_lifecycle.dag_factory import build_lifecycle_dag

    configs, errors = [], []
    for target in args.paths or [paths.model_lines_dir()]:
        if target.is_dir():
            found, failed = load_model_lines(target)
            configs += found
            errors += failed
            continue
        try:
            configs.append(load_model_line(target))
        except ModelLineConfigError as exc:
            errors.append(exc)
    valid = []
    for config in configs:
        try:
            build_lifecycle_dag(config, register=False)
        except Exception as exc:  # noqa: BLE001 - reported like the DAG factory reports it
            errors.append(ModelLineConfigError(config.model_line, [f"its DAG cannot be built: {exc}"]))
        else:
            valid.append(config.model_line)
    for error in errors:
        print(error, file=sys.stderr)
    if not configs and not errors:
        print(f"no model-line files (*.yaml, *.yml) in {', '.join(map(str, args.paths or [paths.model_lines_dir()]))}")
        return 1
    print(f"{len(valid)} valid model line(s): {', '.join(sorted(valid)) or '-'}; {len(errors)} invalid file(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

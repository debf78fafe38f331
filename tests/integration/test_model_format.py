"""Only the model format training writes is ever loaded: a pickle registered by anyone else runs nothing.

Against the session's real MLflow server: someone registers a version whose pickle runs code when
loaded (it creates a marker file). The packaging job and the lifecycle's own loading (the production
comparison in training, the backtest report's champion scoring) refuse it before loading, and the
marker never appears. A skops model as training logs it is accepted; once its recorded digest no longer
matches its files, it is refused too.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENT_DIR = REPO / "include" / "deployment"
if str(DEPLOYMENT_DIR) not in sys.path:
    sys.path.insert(0, str(DEPLOYMENT_DIR))

from model_service.model_format import MODEL_DIGEST_TAG, UnsafeModel, check_model_dir  # noqa: E402
from model_service.package import PackageError, Pin, build  # noqa: E402

MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"mlops-model-format-{os.getpid()}.ran"


class Trap:
    """Unpickling it creates MARKER: what any code in a pickle could do instead."""

    def __reduce__(self) -> tuple:
        return (Path.touch, (MARKER,))

    def predict(self, rows):  # noqa: ANN001, ANN201
        return [0.0] * len(rows)


@pytest.fixture(scope="module")
def training() -> ModuleType:
    path = REPO / "include" / "training" / "lifecycle_training.py"
    spec = importlib.util.spec_from_file_location("lifecycle_training", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("lifecycle_training", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def registry(mlflow_server, tmp_path_factory):  # noqa: ANN001, ANN201
    """Two registered models: a trap logged with cloudpickle, and a skops model logged as training logs it."""
    import mlflow
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import Ridge

    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server.url
    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_experiment("/tests/model_format")
    frame = pd.DataFrame({"x": np.arange(20.0), "y": np.arange(20.0) * 2})
    with mlflow.start_run() as trap_run:
        trap = mlflow.sklearn.log_model(Trap(), name="model", serialization_format="cloudpickle")
    MARKER.unlink(missing_ok=True)  # MLflow loads what it logs once, on the attacker's side
    with mlflow.start_run() as good_run:
        ridge = Ridge().fit(frame[["x"]], frame["y"])
        good = mlflow.sklearn.log_model(
            ridge, name="model", serialization_format="skops", input_example=frame[["x"]].head(3)
        )
        folder = tmp_path_factory.mktemp("good")
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=good.model_uri, dst_path=str(folder)))
        from model_service.model_format import model_digest

        mlflow.set_tag(MODEL_DIGEST_TAG, model_digest(local))
    names = {}
    for kind, info, run in (("trap", trap, trap_run), ("good", good, good_run)):
        name = f"model_format_{kind}_{os.getpid()}"
        names[kind] = (name, str(mlflow.register_model(info.model_uri, name).version), run.info.run_id)
    yield names
    MARKER.unlink(missing_ok=True)


def pin(names: dict, kind: str) -> Pin:
    name, version, run_id = names[kind]
    return Pin(model_line="format_line", model_name=name, model_version=version, run_id=run_id)


def test_packaging_refuses_a_pickled_model_without_loading_it(registry, tmp_path):
    with pytest.raises(PackageError, match="serialization 'cloudpickle', not 'skops'"):
        build(pin(registry, "trap"), tmp_path / "package")
    assert not MARKER.exists(), "the pickle ran"
    assert not (tmp_path / "package").exists()


def test_the_lifecycle_never_loads_a_pickled_model(registry, training):
    name, version, _ = registry["trap"]
    with pytest.raises(UnsafeModel, match="not loaded: .*serialization 'cloudpickle'"):
        training.load_checked_model(f"models:/{name}/{version}")
    assert not MARKER.exists(), "the pickle ran"


def test_a_skops_model_as_training_logs_it_is_packaged_and_loaded(registry, training, tmp_path):
    manifest = build(pin(registry, "good"), tmp_path / "package")
    assert manifest["model_version"] == registry["good"][1]
    name, version, _ = registry["good"]
    import pandas as pd

    model = training.load_checked_model(f"models:/{name}/{version}")
    assert len(model.predict(pd.DataFrame({"x": [1.0, 2.0]}))) == 2


def test_files_other_than_the_ones_recorded_at_training_are_refused(registry, tmp_path):
    from mlflow.tracking import MlflowClient

    name, version, run_id = registry["good"]
    client = MlflowClient()
    recorded = client.get_run(run_id).data.tags[MODEL_DIGEST_TAG]
    client.set_tag(run_id, MODEL_DIGEST_TAG, "0" * 64)  # the artifacts were swapped after training
    try:
        with pytest.raises(PackageError, match="not the ones recorded at training"):
            build(pin(registry, "good"), tmp_path / "package")
    finally:
        client.set_tag(run_id, MODEL_DIGEST_TAG, recorded)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({"python_function": {"loader_module": "my_module.loader"}}, "pyfunc loader 'my_module.loader'"),
        ({"python_function": {"code": "code"}}, "it ships code paths"),
        ({"sklearn": {"skops_trusted_types": ["builtins.eval"]}}, "outside scikit-learn and numpy: ['builtins.eval']"),
        ({"sklearn": {"serialization_format": "pickle"}}, "serialization 'pickle', not 'skops'"),
    ],
)
def test_each_way_out_of_the_trained_format_is_refused(tmp_path, edit, expected):
    flavors = {
        "python_function": {"loader_module": "mlflow.sklearn", "model_path": "model.skops"},
        "sklearn": {"pickled_model": "model.skops", "serialization_format": "skops", "skops_trusted_types": []},
    }
    check_model_dir(_model_dir(tmp_path / "ok", flavors))  # the format training writes
    for flavor, fields in edit.items():
        flavors[flavor] = {**flavors[flavor], **fields}
    with pytest.raises(UnsafeModel, match=expected.replace("[", r"\[").replace("]", r"\]")):
        check_model_dir(_model_dir(tmp_path / "bad", flavors))


def _model_dir(folder: Path, flavors: dict) -> Path:
    import yaml

    folder.mkdir(parents=True)
    (folder / "MLmodel").write_text(yaml.safe_dump({"flavors": flavors}))
    (folder / "model.skops").write_bytes(pickle.dumps({"not": "loaded here"}))
    return folder

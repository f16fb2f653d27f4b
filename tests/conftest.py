import os
from pathlib import Path

import pytest
import torch

from workbench import config
from workbench.data import synthesize_dataset

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session", autouse=True)
def mlflow_sqlite_template(tmp_path_factory):
    """A new SQLite MLflow store starts as a copy of one made (and migrated) once per session:
    the same empty store, without ~3 s of schema migrations in every test that opens one."""
    import shutil

    try:
        import sqlalchemy
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    except ImportError:  # a GPU machine running tests/test_gpu.py without MLflow installed
        yield None
        return

    template = tmp_path_factory.mktemp("mlflow_template") / "empty.db"
    original = SqlAlchemyStore.__init__
    original(SqlAlchemyStore.__new__(SqlAlchemyStore), f"sqlite:///{template}", str(template.parent / "artifacts"))

    def init(self, db_uri, default_artifact_root, *args, **kwargs):
        if isinstance(db_uri, str) and db_uri.startswith("sqlite:///"):
            path = sqlalchemy.engine.make_url(db_uri).database
            if path and path != ":memory:" and not os.path.exists(path) and os.path.isdir(os.path.dirname(path) or "."):
                try:
                    shutil.copyfile(template, path)
                except OSError:
                    pass  # an unwritable folder: let MLflow meet it as it would
        original(self, db_uri, default_artifact_root, *args, **kwargs)

    SqlAlchemyStore.__init__ = init
    try:
        yield template
    finally:
        SqlAlchemyStore.__init__ = original


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic ReID dataset shared by the tests (8 train + 8 test identities)."""
    return synthesize_dataset(tmp_path_factory.mktemp("data") / "hands", identities=8, images_per_identity=4,
                              seed=1, size=(64, 32))


@pytest.fixture
def tiny_config(synth_root, tmp_path) -> config.Config:
    """The quickstart at test size: tiny CLIP, 32x32 inputs... one epoch of each stage, CPU."""
    return config.load("experiments/quickstart.yaml", [
        f"data_root={synth_root}", f"output_dir={tmp_path / 'runs'}", "synthesize_if_missing=false",
        "epochs_prompt=2", "epochs_image=2", "batch_size=8", "num_instances=2", "log_every=2",
        "test_batch_size=32", "device=cpu", "image_size=[64, 32]", "val_identities=2",
        "tune.n_jobs=1"])  # the quickstart tunes two trials at a time; tests choose where they want that


@pytest.fixture
def new_store(mlflow_sqlite_template):
    """``new_store(path)``: the URI of a new SQLite MLflow store at ``path``, already migrated (a
    copy of the template), for tests whose subprocesses open it."""
    import shutil

    def make(path) -> str:
        shutil.copyfile(mlflow_sqlite_template, path)
        return f"sqlite:///{path}"

    return make


def _interrupted_run(cfg, tracker=None, at_epoch: int = 1) -> Path:
    """The run folder of ``cfg`` interrupted (Ctrl-C) after its ``at_epoch``-th image epoch."""
    from workbench.runner import train_joint

    def stop(epoch, metrics):
        if epoch == at_epoch:
            raise KeyboardInterrupt

    before = set(Path(cfg.output_dir).iterdir()) if Path(cfg.output_dir).is_dir() else set()
    with pytest.raises(KeyboardInterrupt):
        train_joint(cfg, tracker, report=stop)
    (run_dir,) = set(Path(cfg.output_dir).iterdir()) - before
    return run_dir


@pytest.fixture
def interrupted_run():
    """``interrupted_run(cfg, tracker=None, at_epoch=1)``: run ``cfg`` until Ctrl-C after that
    image epoch; returns the new run folder."""
    return _interrupted_run

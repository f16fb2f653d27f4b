from pathlib import Path

import pytest

from workbench import config
from workbench.config import Config, ConfigError, build_filename


def write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_and_original_keys_load(tmp_path):
    cfg = config.load(write(tmp_path, "epochs_prompt: 5\nepochs_image: 7\nlr: 1.0e-4\nn_ctx: 8\n"
                                      "model_type: ViT-B/32\nstage_mode: prompt_only\nloss_list: [supcon, tri]\n"
                                      "center_loss_weight: 0.001\ncenter_lr: 0.5\nfreeze_prompt: true\n"))
    assert cfg.epochs_prompt == 5 and cfg.lr == 1e-4 and cfg.n_ctx == 8
    assert cfg.losses == ("triplet", "i2t", "t2i")
    assert cfg.batch_size == 32 and cfg.triplet_margin == 0.3  # defaults filled


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match="did you mean epochs_image"):
        config.load(write(tmp_path, "epochs_imag: 3\n"))
    with pytest.raises(ConfigError, match="did you mean n_ctx"):
        config.load(None, ["n_ctxx=3"])


@pytest.mark.parametrize("override, key", [
    ("lr=-1e-4", "lr"), ("n_ctx=80", "n_ctx"), ("stage_mode=both", "stage_mode"),
    ("prompt_template=hand of a person", "prompt_template"), ("lr=fast", "lr"), ("n_ctx=2.5", "n_ctx"),
    ("batch_size=30", "batch_size"), ("image_size=[256]", "image_size"), ("loss_list=[id, foo]", "loss_list"),
    ("tune.metric=3", "tune.metric"), ("device=tpu", "device"),
    # the recipe and selection keys
    ("id_head=cosface", "id_head"), ("train_feature=unit", "train_feature"), ("test_feature=all", "test_feature"),
    ("i2t_mode=global", "i2t_mode"), ("prompt_logit_mode=dot", "prompt_logit_mode"),
    ("lr_schedule=step", "lr_schedule"), ("select_metric=rank5", "select_metric"), ("warmup_factor=0", "warmup_factor"),
    ("id_loss_weight=-1", "id_loss_weight"), ("val_identities=2.5", "val_identities"),
    ("val_identities=-1", "val_identities"), ("pixel_std=[0.5, 0.5]", "pixel_std"),
    ("i2t_label_smoothing=1.5", "i2t_label_smoothing"), ("bias_lr_factor=0", "bias_lr_factor"),
    # scaling out: heartbeats of database studies
    ("tune.heartbeat_interval=0", "tune.heartbeat_interval"), ("tune.grace_period=30", "tune.grace_period"),
    ("tune.retry_failed=-1", "tune.retry_failed"),
    ("num_workers=-1", "num_workers"), ("num_workers=many", "num_workers"), ("num_workers=2.5", "num_workers"),
    # values numpy, torch or the transforms would refuse mid-run, or take without a word
    ("lr=.nan", "lr"), ("center_loss_weight=.inf", "center_loss_weight"), ("arcface_margin=.inf", "arcface_margin"),
    ("pixel_mean=[.nan, 0.5, 0.5]", "pixel_mean"), ("seed=-1", "seed"), ("seed=4294967296", "seed"),
    ("val_seed=-1", "val_seed"), ("pad=-1", "pad"), ("pad=1000", "pad"),
    ("tune.space={lr: {type: float, low: .nan, high: 1}}", "tune.space.lr"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        config.load(None, [override])
    assert str(err.value).startswith(key)


def test_overrides_are_yaml_scalars_and_keep_types():
    cfg = config.load(None, ["lr=1e-3", "epochs_image=3", "freeze_prompt=false", "pretrained=null",
                             "image_size=[128, 64]", "tune.metric=best_rank1"])
    assert cfg.lr == 1e-3 and cfg.epochs_image == 3 and cfg.freeze_prompt is False
    assert cfg.pretrained is None and cfg.image_size == [128, 64] and cfg.tune.metric == "best_rank1"
    assert config.load(None, ["lr=1"]).lr == 1.0  # an int where a float is expected is fine
    assert config.load(None).num_workers == "auto" and config.load(None, ["num_workers=3"]).num_workers == 3
    for bad in ("num_workers=2.5", "num_workers=null", "num_workers=lots"):
        with pytest.raises(ConfigError, match="^num_workers: must be auto or a count >= 0, got"):
            config.load(None, [bad])
    with pytest.raises(ConfigError):
        config.load(None, ["nokeyvalue"])


def test_config_is_frozen_and_replace_validates():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.lr = 1.0  # type: ignore[misc]
    assert config.replace(cfg, lr=0.1).lr == 0.1
    with pytest.raises(ConfigError):
        config.replace(cfg, n_ctx=0)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder; give an experiment YAML file"):
        config.load(tmp_path)
    with pytest.raises(ConfigError, match="mapping"):
        config.load(write(tmp_path, "- a\n- b\n"))
    # a key given twice would let the later value win without a word, at any depth
    with pytest.raises(ConfigError, match="at line 3, column 1: key 'lr' appears twice"):
        config.load(write(tmp_path, "lr: 1.0e-3\nn_ctx: 4\nlr: 2.0e-3\n"))
    with pytest.raises(ConfigError, match="key 'metric' appears twice"):
        config.load(write(tmp_path, "tune:\n  metric: best_mAP\n  metric: best_rank1\n"))
    # YAML merge keys still work: keys written beside `<<:` override the merged ones without a word
    merged = config.load(write(tmp_path, "tune:\n  space:\n    lr: &grid {type: float, low: 1.0e-4, high: 1.0e-2}\n"
                                         "    center_lr:\n      <<: *grid\n      high: 0.1\n"))
    assert merged.tune.space["center_lr"] == {"type": "float", "low": 1e-4, "high": 0.1}


def test_limits_and_their_wording():
    assert config.load(None, ["seed=4294967295", "weight_decay=0", "pad=0", "eta_min=0"]).seed == 2**32 - 1
    with pytest.raises(ConfigError, match=r"^weight_decay: must be >= 0, got -1.0$"):
        config.load(None, ["weight_decay=-1"])
    with pytest.raises(ConfigError, match=r"^lr: must be a finite number, got nan$"):
        config.load(None, ["lr=.nan"])


def test_build_filename_carries_every_part():
    cfg = config.load(None, ["experiment=exp1", "model_type=ViT-B/16", "dataset=11k", "aspect=dorsal right",
                             "variant=v2", "lr=5e-5", "batch_size=32", "n_ctx=12"])
    name = build_filename(cfg, 40, "image", "pth", tag="BEST")
    assert name == "exp1_ViTB16_11k_dorsalright_v2_e40_lr5e-05_bs32_nctx12_image_BEST.pth"
    assert build_filename(cfg, 40, "image") == name[:-len("_BEST.pth")]
    assert build_filename(cfg, 40, "image", "log", timestamped=True).endswith(".log")
    image_only = config.replace(cfg, stage_mode="image_only", epochs_prompt=0)
    assert "nctx" not in build_filename(image_only, 40, "image")


def test_hash_is_stable_and_sensitive():
    assert Config().hash() == Config().hash()
    assert Config().hash() != config.replace(Config(), lr=0.01).hash()
    flat = config.flatten(Config().to_dict())
    assert flat["tune.metric"] == "best_mAP" and "lr" in flat


def test_readme_documents_every_key():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [f for f in Config().to_dict() if f"`{f}`" not in readme]
    assert not missing, f"README config reference lacks {missing}"


def test_recipe_cross_field_checks():
    with pytest.raises(ConfigError, match="^lr_steps"):
        config.load(None, ["lr_schedule=multistep"])
    with pytest.raises(ConfigError, match="^lr_steps"):
        config.load(None, ["lr_schedule=multistep", "lr_steps=[30, 20]"])
    with pytest.raises(ConfigError, match="^lr_steps"):
        config.load(None, ["lr_schedule=multistep", "lr_steps=[30, 50]", "epochs_image=40"])
    with pytest.raises(ConfigError, match="^i2t_mode: all_classes has no t2i"):
        config.load(None, ["i2t_mode=all_classes"])
    with pytest.raises(ConfigError, match="^i2t_mode: all_classes encodes"):
        config.load(None, ["i2t_mode=all_classes", "loss_list=[id, i2t]", "freeze_prompt=false"])
    cfg = config.load(None, ["i2t_mode=all_classes", "loss_list=[id, triplet, i2t]", "triplet_margin=null"])
    assert cfg.losses == ("id", "triplet", "i2t") and cfg.triplet_margin is None
    assert config.load(None, ["val_identities=12"]).has_holdout and not config.load(None).has_holdout


@pytest.mark.parametrize("path", sorted(Path("experiments").glob("*.yaml")))
def test_every_experiment_loads_with_a_holdout(path):
    cfg = config.load(path)
    assert cfg.has_holdout, f"{path} selects on the test split"


@pytest.mark.parametrize("key", ["val_identities", "val_seed", "seed", "select_metric", "synth_identities",
                                 "num_workers"])  # the worker count never changes a run's numbers
def test_tuning_may_not_search_the_data_or_the_selection(key):
    with pytest.raises(ConfigError, match=f"^tune.space.{key}: not a tunable config key"):
        config.load(None, [f"tune.space={{{key}: {{type: int, low: 1, high: 3}}}}"])


def test_search_space_numbers_written_like_1e_4_are_numbers(tmp_path):
    from workbench.tuning import _in_space

    cfg = config.load(write(tmp_path, "tune:\n  space:\n    lr: {type: float, low: 1e-5, high: 1e-3, log: true}\n"
                                      "    n_ctx: {type: int, low: 2, high: 1e1}\n"))
    assert cfg.tune.space["lr"] == {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}
    assert cfg.tune.space["n_ctx"]["high"] == 10 and isinstance(cfg.tune.space["n_ctx"]["high"], int)
    assert _in_space(1e-4, cfg.tune.space["lr"])


def test_malformed_yaml_names_line_column_and_problem(tmp_path):
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, "lr: 1e-4\nn_ctx: [4, 8\nseed: 1\n"))
    message = str(err.value)
    assert "line 3, column 5" in message and "expected ',' or ']'" in message and "\n" not in message
    binary = tmp_path / "weights.pt"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="not a text file"):
        config.load(binary)

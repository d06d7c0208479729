import math
import tomllib
from pathlib import Path

import pytest
import torch

from raycnn import suites, trainer
from raycnn.errors import SuiteError
from raycnn.config import MODELS, TrainConfig, normalization
from raycnn import augment

# The bundled suites and the study suites (suite files run by path, kept under benchmarks/).
STUDIES = Path(__file__).resolve().parent.parent / "benchmarks" / "studies"
SUITE_FILES = sorted(suites.BUNDLED.glob("*.toml")) + sorted(STUDIES.glob("*.toml"))


def test_bundled_suites_hold_the_report_grid():
    loaded = {name: suites.load(path) for name, path in suites.bundled().items()}
    counts = {name: len(s.trials) for name, s in loaded.items()}
    assert counts == {"mnist": 40, "cifar10": 11, "pretrained": 8}
    every = [t for s in loaded.values() for t in s.trials]
    assert all(not math.isnan(t.report_acc) for t in every)        # the report's number beside each
    names = {t.name: t for t in every}
    t = names["mnist/base/sgd-momentum/lr0.001"]
    assert (t.config.optimizer, t.config.momentum, t.config.lr, t.config.epochs, t.report_acc) == ("sgd", 0.9, 0.001, 10, 0.98)
    assert (t.table, t.row, t.column) == ("3.2 MNIST, lr = 0.001", "Base Model", "SGD + momentum")
    assert names["mnist/dropout/adamw/lr0.01"].config.weight_decay == 0.01
    assert names["cifar10/base/scheduler"].config.scheduler == "multistep"
    assert names["cifar10/base/scheduler"].config.milestones == (10, 22)
    jitter = names["cifar10/augment/jitter"].config
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue, jitter.augment) == (
        (3.0, 10.0), (3.0, 10.0), (3.0, 10.0), (-0.5, 0.5), ("jitter",))
    assert (names["cifar10/augment/crop"].config.crop_padding, names["cifar10/augment/flip"].config.flip_p) == (10, 0.5)
    pre = names["pretrained/finetune/layers1-4"].config
    assert (pre.normalize, pre.crop_padding, pre.augment, pre.pretrained) == ("imagenet", 4, ("crop", "flip"), True)
    ft = names["pretrained/finetune/layer3"].config
    assert (ft.finetune, ft.backbone_lr, ft.classifier_lr, ft.weight_decay) == ("layer3", 0.001, 0.1, 1e-4)
    assert names["pretrained/finetune/layers1-4-early-stopping"].config.early_stopping_patience > 0


def write(tmp_path, text, name="s.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_axes_defaults_and_explicit_trials(tmp_path):
    path = write(tmp_path, """
[suite]
name = "mine"
gpus_per_trial = 0.25
[defaults]
model = "cifar_base"
epochs = 2
[[axes]]
name = "opt"
role = "column"
values = [{ label = "sgd", title = "SGD", optimizer = "sgd" }, { label = "adam", optimizer = "adam", lr = 0.001 }]
[[axes]]
name = "net"
role = "row"
values = [{ label = "base", title = "Base" }]
[report]
"mine/adam/base" = 55
[[trials]]
name = "extra"
table = "T"
report = 60
augment = ["flip"]
gpus_per_trial = 1
""")
    s = suites.load(path)
    assert [t.name for t in s.trials] == ["mine/sgd/base", "mine/adam/base", "mine/extra"]
    sgd, adam, extra = s.trials
    assert (adam.config.lr, adam.column, adam.row, adam.report_acc) == (0.001, "adam", "Base", 0.55)
    assert math.isnan(sgd.report_acc) and sgd.column == "SGD" and sgd.config.epochs == 2
    assert (extra.config.augment, extra.gpus_per_trial, sgd.gpus_per_trial) == (("flip",), 1.0, 0.25)
    assert suites.resolve(str(path)) == [path]


@pytest.mark.parametrize("text,message", [
    ("[defaults]\nlearning_rate = 1\n[[trials]]\nname='a'", "[defaults]: unknown key 'learning_rate'"),
    ("[[trials]]\nname='a'\noptimiser='sgd'", "unknown key 'optimiser'"),
    ("[[trials]]\nname='a'\nmodel='vgg'", "trial s/a: unknown model"),
    ("[[trials]]\nname='a'\nlr=-1.0", "trial s/a: lr must be positive"),
    ("[[trials]]\nname='a'\naugment=['rotate']", "unknown augmentation"),
    ("[[trials]]\nname='a'\n[[trials]]\nname='a'", "appears twice"),
    ("[[trials]]\nname='a'\nreport=250", "report must be a percentage"),
    ("[report]\n'x/y' = 3\n[[trials]]\nname='a'", "[report] names trials that do not exist"),
    ("[[axes]]\nname='n'\nrole='diagonal'\nvalues=[{label='a'}]", "needs role"),
    ("[suite]\nname='s'\n", "no trials"),
    ("[[trials]]\nname = ", "cannot read suite"),
    ("[[trials]]\nname='a'\nepochs='ten'", "trial s/a: epochs must be int"),
    ("[[trials]]\nname='a'\nhue=[-2.0, 2.0]", "trial s/a: hue must be [lo, hi] with -0.5 <= lo <= hi <= 0.5"),
    ("[[trials]]\nname='a'\nhue=0.7", "trial s/a: hue = 0.7: a single number must be in [0, 0.5]"),
    ("[[trials]]\nname='a'\ncrop_padding=-3", "trial s/a: crop_padding must not be negative"),
    ("[[trials]]\nname='a'\nflip_p=7", "trial s/a: flip_p must be a probability in [0, 1], got 7.0"),
    ("[[trials]]\nname='a'\nmilestones=[22, 10]", "trial s/a: milestones must be positive epochs in increasing order"),
    ("[[trials]]\nname='a'\npretrained=true", "trial s/a: pretrained = true needs a model with ImageNet weights"),
])
def test_malformed_suites_name_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(SuiteError) as e:
        suites.load(path)
    assert str(path) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_unknown_suite():
    with pytest.raises(SuiteError, match="unknown suite 'imagenet'"):
        suites.resolve("imagenet")


def _written(doc: dict) -> dict[str, dict]:
    """What a suite file itself says of each trial's config: trial name -> the merged keys of
    [defaults], its axis values or its [[trials]] entry (later ones win)."""
    config_keys = set(TrainConfig().to_dict())
    pick = lambda d: {k: v for k, v in d.items() if k in config_keys}
    name = doc.get("suite", {}).get("name")
    out = {}
    axes = doc.get("axes", [])
    if axes:
        import itertools
        for combo in itertools.product(*(a["values"] for a in axes)):
            merged = pick(doc.get("defaults", {}))
            for value in combo:
                merged |= pick(value)
            out[f"{name}/" + "/".join(v["label"] for v in combo)] = merged
    for t in doc.get("trials", []):
        out[f"{name}/{t['name']}"] = pick(doc.get("defaults", {})) | pick(t)
    return out


@pytest.mark.parametrize("path", SUITE_FILES, ids=[p.stem for p in SUITE_FILES])
def test_every_written_knob_reaches_config_and_pipeline(path):
    written = _written(tomllib.loads(path.read_text()))
    loaded = {t.name: t.config for t in suites.load(path).trials}
    assert set(written) == set(loaded)
    for name, keys in written.items():
        config = loaded[name]
        for key, value in keys.items():          # each value as TrainConfig reads it on its own
            assert getattr(config, key) == getattr(TrainConfig.from_dict({key: value}), key), (name, key)
        pipe = trainer.build_pipeline(config, torch.device("cpu"))
        on = set(config.augment)
        assert pipe.jitter == ({k: getattr(config, k) for k in augment.FAST_OPS} if "jitter" in on else {}), name
        assert (pipe.crop_padding, pipe.flip_p, pipe.jitter_mode) == (
            config.crop_padding if "crop" in on else 0, config.flip_p if "flip" in on else 0.0, config.jitter_mode)
        assert pipe.size == (config.image_size or MODELS[config.model].input_size)
        mean, std = normalization(config.normalize, config.dataset_name)
        assert torch.equal(pipe.mean.flatten(), torch.tensor(mean)) and torch.equal(pipe.std.flatten(), torch.tensor(std))


@pytest.mark.parametrize("path", SUITE_FILES, ids=[p.stem for p in SUITE_FILES])
def test_each_suite_declares_its_normalization(path):
    doc = tomllib.loads(path.read_text())
    assert "normalize" in doc.get("defaults", {}), f"{path.name}: [defaults] must say normalize = ..."
    want = "imagenet" if doc["defaults"].get("pretrained") else "dataset"
    assert {t.config.normalize for t in suites.load(path).trials} == {want}


def test_faithful_jitter_study_is_the_jitter_cell_but_for_the_mode():
    study = suites.load(STUDIES / "cifar10-jitter-faithful.toml").trials[0].config
    cell = {t.name: t for t in suites.load(suites.bundled()["cifar10"]).trials}["cifar10/augment/jitter"].config
    assert (cell.jitter_mode, study.jitter_mode) == ("fast", "faithful")
    from dataclasses import replace
    assert replace(study, jitter_mode="fast") == cell


def test_colorjitters_scalar_forms_in_a_suite(tmp_path):
    path = write(tmp_path, "[[trials]]\nname='a'\nmodel='cifar_base'\naugment=['jitter']\nhue=0.5\nbrightness=0.4")
    config = suites.load(path).trials[0].config
    assert config.hue == (-0.5, 0.5) and config.brightness == pytest.approx((0.6, 1.4))

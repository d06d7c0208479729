import math

import pytest

from raycnn import suites
from raycnn.suites import SuiteError


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
    assert names["cifar10/augment/jitter"].config.brightness == (3.0, 10.0)
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
])
def test_malformed_suites_name_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(SuiteError) as e:
        suites.load(path)
    assert str(path) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_unknown_suite():
    with pytest.raises(SuiteError, match="unknown suite 'imagenet'"):
        suites.resolve("imagenet")

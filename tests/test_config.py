"""config.resolve: where each value comes from, and the frozen result."""
import pytest

import config
from utils import UserError


def resolve(script, *argv):
    return config.resolve(config.get_args_parser(script).parse_args([str(a) for a in argv]), script)


def test_values_come_from_the_flag_then_the_recipe_then_the_defaults(tmp_path):
    cfg, resume = resolve("base", "--dataset", "cifar100", "--lr", 0.2, "--device", "cpu")
    assert resume is None
    assert cfg.lr == 0.2 and cfg.batch_size == 64 and cfg.weight_decay == 5e-4 and cfg.nesterov is False
    assert cfg.model == config.DEFAULTS["model"] and cfg.seed == 0 and cfg.compile is False
    assert cfg.amp == "off" and cfg.channels_last is False  # resolved for the CPU
    assert cfg.output_dir == "runs/cifar100-resnet20-seed0"
    assert not any(key in vars(cfg) for key in config.KD_ONLY)
    assert cfg.padding == "zeros"  # RepDistiller's
    cfg, _ = resolve("base", "--epochs", 20, "--device", "cpu")
    assert cfg.lr_milestones == [10, 15]  # the CIFAR-10 recipe's 100, 150 scaled to 20 epochs
    assert cfg.padding == "reflect"  # the seed zoo's
    cfg, _ = resolve("base", "--padding", "zeros", "--device", "cpu")
    assert cfg.padding == "zeros"


def test_the_config_is_frozen():
    cfg, _ = resolve("base", "--device", "cpu")
    with pytest.raises(AttributeError, match="frozen"):
        cfg.lr = 1.0
    with pytest.raises(AttributeError, match="frozen"):
        del cfg.lr
    assert cfg.lr == 0.1


def test_kd_values_come_from_the_teacher_and_the_method(teacher):
    cfg, _ = resolve("kd", "--teacher", teacher, "--method", "crd", "--device", "cpu")
    assert cfg.dataset == "cifar10" and cfg.teacher_arch == "resnet8"
    assert cfg.kd_weight == 0.2 and cfg.crd_negatives == 16384 and cfg.stage_cache is None
    assert config.method_hyperparameters(cfg) == {"crd_feat_dim": 128, "crd_negatives": 16384, "crd_T": 0.07,
                                                  "crd_momentum": 0.5}
    assert not hasattr(cfg, "T") and not hasattr(cfg, "ft_k")  # other methods' flags are not part of it
    cfg, _ = resolve("kd", "--teacher", teacher, "--method", "st", "--T", 2, "--kd-weight", 0.5, "--device", "cpu")
    assert (cfg.T, cfg.kd_weight) == (2.0, 0.5)
    with pytest.raises(UserError, match="--ft-k belongs to --method ft, not to --method st"):
        resolve("kd", "--teacher", teacher, "--method", "st", "--ft-k", 0.25, "--device", "cpu")


def test_logit_stand_brings_the_official_settings_unless_given(teacher):
    cfg, _ = resolve("kd", "--teacher", teacher, "--method", "st", "--device", "cpu")
    assert (cfg.logit_stand, cfg.T, cfg.kd_weight, cfg.ce_weight) == (False, 4.0, 0.1, 1.0)
    cfg, _ = resolve("kd", "--teacher", teacher, "--method", "st", "--logit-stand", "--device", "cpu")
    assert (cfg.logit_stand, cfg.T, cfg.kd_weight, cfg.ce_weight) == (True, 2.0, 9.0, 0.1)
    assert config.method_hyperparameters(cfg) == {"T": 2.0, "logit_stand": True}
    cfg, _ = resolve("kd", "--teacher", teacher, "--method", "dkd", "--logit-stand", "--T", 3, "--ce-weight", 0.5,
                     "--device", "cpu")
    assert (cfg.T, cfg.kd_weight, cfg.ce_weight, cfg.dkd_beta) == (3.0, 9.0, 0.5, 8.0)  # beta: the pair's, resolved
    cfg, _ = resolve("kd", "--teacher", teacher, "--method", "mlkd", "--device", "cpu")
    assert (cfg.logit_stand, cfg.T, cfg.kd_weight, cfg.ce_weight) == (False, 4.0, 0.9, 0.1)
    cfg, _ = resolve("kd", "--teacher", teacher, "--method", "mlkd", "--logit-stand", "--device", "cpu")
    assert (cfg.logit_stand, cfg.T, cfg.kd_weight, cfg.ce_weight) == (True, 2.0, 9.0, 0.1)
    with pytest.raises(UserError, match="--logit-stand belongs to --method st, dkd, ctkd, mlkd, not to --method at"):
        resolve("kd", "--teacher", teacher, "--method", "at", "--logit-stand", "--device", "cpu")


def test_logit_stand_settings_per_pair():
    from kd_losses import METHODS
    assert METHODS["st"].logit_stand_defaults("ResNet50", "MobileNetV2") == {"T": 3.0, "kd_weight": 1.0,
                                                                             "ce_weight": 0.1}
    assert METHODS["dkd"].logit_stand_defaults("resnet56", "resnet20") == {"T": 3.0, "kd_weight": 18.0,
                                                                           "dkd_beta": 2.0}
    assert METHODS["dkd"].logit_stand_defaults("resnet32x4", "resnet8x4") == {"T": 2.0, "kd_weight": 9.0}


# Every CIFAR-100 log of the logit standardisation code (sunshangquan/logit-standardization-KD, logs/
# {KD,DKD,CTKD,MLKD}/), as its README names them: KD_TYPE,TEACHER,STUDENT,BASE_TEMPERATURE,KD_WEIGHT[,DKD_BETA]
# (DKD's KD weight multiplies its alpha and beta; CE is 0.1 for KD, CTKD and MLKD, 1 for DKD). A DKD name
# without a beta ran its config's, 8. MLKD's names shorten the networks (res110 is resnet110, mv2 MobileNetV2).
LS_LOGS = """
kd,ResNet50,MobileNetV2,3,1 kd,resnet110,resnet20,4,12 kd,resnet110,resnet32,2,9 kd,resnet32x4,ShuffleV2,2,9
kd,resnet32x4,resnet8x4,2,9 kd,resnet32x4,wrn_16_2,3,9 kd,resnet32x4,wrn_40_2,3,9 kd,resnet56,resnet20,2,9
kd,vgg13,MobileNetV2,3,9 kd,vgg13,vgg8,3,9 kd,wrn_40_2,MobileNetV2,3,9 kd,wrn_40_2,resnet8x4,2,9
kd,wrn_40_2,wrn_16_2,2,9 kd,wrn_40_2,wrn_40_1,2,9
dkd,ResNet50,MobileNetV2,2,15,2.0 dkd,resnet110,resnet20,2,15,2.0 dkd,resnet110,resnet32,2,15,2.0
dkd,resnet32x4,ShuffleV2,2,9 dkd,resnet32x4,resnet8x4,2,9 dkd,resnet32x4,wrn_16_2,2,9,2.0
dkd,resnet32x4,wrn_40_2,2,9,8.0 dkd,resnet56,resnet20,3,18,2.0 dkd,vgg13,MobileNetV2,3,9,2.0 dkd,vgg13,vgg8,2,15,2.0
dkd,wrn_40_2,MobileNetV2,2,15,2.0 dkd,wrn_40_2,resnet8x4,2,18,2.0 dkd,wrn_40_2,wrn_16_2,2,12,2.0
dkd,wrn_40_2,wrn_40_1,2,12,2.0
ctkd,ResNet50,MobileNetV2,2,9 ctkd,resnet110,resnet20,2,9 ctkd,resnet110,resnet32,2,9 ctkd,resnet32x4,ShuffleV2,2,9
ctkd,resnet32x4,resnet8x4,2,9 ctkd,resnet32x4,wrn_16_2,2,9 ctkd,resnet32x4,wrn_40_2,2,9 ctkd,resnet56,resnet20,2,9
ctkd,vgg13,MobileNetV2,2,9 ctkd,vgg13,vgg8,2,9 ctkd,wrn_40_2,MobileNetV2,2,9 ctkd,wrn_40_2,resnet8x4,2,9
ctkd,wrn_40_2,wrn_16_2,2,9 ctkd,wrn_40_2,wrn_40_1,2,9
mlkd,res110,res20,2,9 mlkd,res110,res32,2,9 mlkd,res50,mv2,2,9 mlkd,resnet32x4,ShuffleV2,2,6
mlkd,resnet32x4,resnet8x4,2,9 mlkd,resnet32x4,wrn_16_2,2,9 mlkd,resnet32x4,wrn_40_2,2,9 mlkd,vgg13,MobileNetV2,2,6
mlkd,vgg13,vgg8,2,6 mlkd,wrn_40_2,resnet8x4,2,9 mlkd,wrn_40_2,wrn_16_2,2,9 mlkd,wrn_40_2,wrn_40_1,2,9
""".split()
LS_NAMES = {"res110": "resnet110", "res20": "resnet20", "res32": "resnet32", "res50": "ResNet50", "mv2": "MobileNetV2"}


@pytest.mark.parametrize("log", LS_LOGS)
def test_logit_stand_brings_each_official_runs_settings(log):
    from conftest import resolved_settings
    kind, teacher, student, T, weight, *beta = log.split(",")
    method = {"kd": "st"}.get(kind, kind)
    teacher, student = LS_NAMES.get(teacher, teacher), LS_NAMES.get(student, student)
    settings = resolved_settings(method, teacher, student, logit_stand=True)
    expected = {"kd_weight": float(weight), "ce_weight": 1.0 if kind == "dkd" else 0.1}
    if kind != "ctkd":  # CTKD learns its temperature
        expected["T"] = float(T)
    if kind == "dkd":
        expected["dkd_beta"] = float(beta[0]) if beta else 8.0
    assert {key: settings[key] for key in expected} == expected


def fake_teacher(tmp_path, arch, dataset):
    """A checkpoint that says what config.resolve reads of a teacher: its architecture, classes and data set."""
    import torch

    from engine.checkpoint import CHECKPOINT_FORMAT
    path = tmp_path / f"{arch}-{dataset}.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "arch": arch, "num_classes": 100 if dataset == "cifar100" else 10,
                "dataset": dataset, "model": {}}, path)
    return path


def test_the_cifar100_recipe_trains_mobilenet_and_shufflenets_at_lr_0_01(tmp_path, capsys):
    """RepDistiller's rule (train_student.py L92-94, train_teacher.py L54-56), for students and teachers."""
    for model in ("MobileNetV2", "ShuffleV1", "ShuffleV2"):
        assert resolve("base", "--dataset", "cifar100", "--model", model, "--device", "cpu")[0].lr == 0.01
        assert resolve("base", "--dataset", "cifar10", "--model", model, "--device", "cpu")[0].lr == 0.1
    assert resolve("base", "--dataset", "cifar100", "--model", "MobileNetV2", "--lr", 0.03, "--device", "cpu")[0].lr == 0.03
    teacher = fake_teacher(tmp_path, "resnet32x4", "cifar100")
    capsys.readouterr()
    cfg, _ = resolve("kd", "--teacher", teacher, "--student", "ShuffleV1", "--method", "st", "--device", "cpu")
    assert cfg.lr == 0.01 and "lr 0.01 (ShuffleV1's in the cifar100 recipe)" in capsys.readouterr().out
    cfg, _ = resolve("kd", "--teacher", teacher, "--student", "resnet8x4", "--method", "st", "--device", "cpu")
    assert cfg.lr == 0.05 and "recipe: epochs 240, lr milestones [150, 180, 210], batch size 64, lr 0.05," in \
        capsys.readouterr().out


def test_mlkd_takes_its_official_recipe_unless_given(tmp_path):
    """MLKD's configs: LR 0.025 (0.01 for MobileNet and ShuffleNet students) on both data sets; on CIFAR-100
    480 or 960 epochs on some pairs (the logit standardisation configs: 480, 960 for resnet32x4 ->
    ShuffleV1/V2), the LR decaying at 150, 180 and 210."""
    c10, c100 = fake_teacher(tmp_path, "resnet56", "cifar10"), fake_teacher(tmp_path, "resnet32x4", "cifar100")

    def mlkd(teacher, student, *flags):
        cfg, _ = resolve("kd", "--teacher", teacher, "--student", student, "--method", "mlkd", "--device", "cpu", *flags)
        return cfg.lr, cfg.epochs, cfg.lr_milestones
    assert mlkd(c10, "resnet20") == (0.025, 200, [100, 150])
    assert mlkd(c10, "MobileNetV2") == (0.01, 200, [100, 150])
    assert mlkd(c100, "resnet8x4") == (0.025, 240, [150, 180, 210])
    assert mlkd(c100, "ShuffleV1") == (0.01, 960, [150, 180, 210])
    assert mlkd(c100, "resnet8x4", "--logit-stand") == (0.025, 480, [150, 180, 210])
    assert mlkd(c100, "ShuffleV1", "--epochs", 24) == (0.01, 24, [15, 18, 21])  # scaled from the recipe
    assert mlkd(c100, "ShuffleV1", "--lr", 0.05, "--epochs", 240) == (0.05, 240, [150, 180, 210])
    assert resolve("kd", "--teacher", c100, "--student", "resnet8x4", "--method", "st", "--device", "cpu")[0].lr == 0.05


def test_a_run_saved_before_a_setting_existed_has_the_value_it_trained_with():
    """args.json of a run saved before --padding, --drop-last and --eval-every: its identity holds what
    it did (zero padding, every batch kept, every epoch evaluated), so a sweep resumes or skips it
    rather than calling it another run, and one asking for reflection padding or --drop-last sees
    that it differs."""
    old = {"dataset": "cifar10", "lr": 0.1, "output_dir": "runs/x"}
    assert config.run_identity(old) == {"dataset": "cifar10", "lr": 0.1, "padding": "zeros", "drop_last": False,
                                        "eval_every": 1}
    assert config.run_identity({**old, "padding": "reflect", "drop_last": True})["drop_last"] is True

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

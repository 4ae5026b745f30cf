"""The engine both scripts share, one job a file:

  loop.py        fit(): train, step the LR, evaluate, record, save; train_one_epoch, evaluate
  tasks.py       what is trained: Supervised (cross-entropy), Distiller (student + KD method), and
                 the frozen Teacher
  checkpoint.py  last.pt / best.pt, safe loading, resume, and the stage result of FT, AB and FSP
  processes.py   device and rank, torchrun and DDP, reductions, replica checks, signals
  teacher_cache.py  the teacher's outputs on every augmented view, computed once (--teacher-cache)
"""
from .checkpoint import run_stage  # noqa: F401
from .loop import DIVERGED, build_optimizer, evaluate, fit, train_one_epoch, train_step  # noqa: F401
from .processes import setup_device  # noqa: F401
from .tasks import Distiller, Supervised, Teacher, load_predictor  # noqa: F401
from .teacher_cache import prepare_teacher_cache  # noqa: F401

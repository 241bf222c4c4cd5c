from unmask.train.optim import *  # noqa
from unmask.train.optim import set_peak_lr  # noqa

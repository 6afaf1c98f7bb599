"""tunesmith: fine-tune a small pretrained language model on a text you love, locally.

    import tunesmith
    data = tunesmith.prepare("book.txt")            # clean, cut and split the text
    run = tunesmith.finetune(data.dir, epochs=2)     # LoRA fine-tune into a run directory
    model = tunesmith.load(run.path)                 # base + adapter, ready to write
    print(model.generate("It was a dark night", max_tokens=80)[0].text)
"""

from .classify import Classifier, finetune_classifier
from .config import SamplingConfig, TrainConfig
from .errors import TunesmithError
from .events import TrainEvent
from .generate import Completion, Model, load
from .prepare import prepare
from .rundir import Run
from .train import finetune, resume
from .version import __version__

__all__ = ["Classifier", "Completion", "Model", "Run", "SamplingConfig", "TrainConfig", "TrainEvent", "TunesmithError",
           "finetune", "finetune_classifier", "load", "prepare", "resume", "__version__"]

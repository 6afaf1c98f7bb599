"""tunesmith: fine-tune a small pretrained language model on a text you love, locally.

    import tunesmith
    data = tunesmith.prepare("book.txt")            # clean, cut and split the text
    run = tunesmith.finetune(data.dir, epochs=2)     # LoRA fine-tune into a run directory
    model = tunesmith.load(run.path)                 # base + adapter, ready to write
    print(model.generate("It was a dark night", max_tokens=80)[0].text)
"""

__version__ = "0.1.0"

from .classify import Classifier, finetune_classifier  # noqa: E402
from .errors import TunesmithError  # noqa: E402
from .generate import Completion, Model, load  # noqa: E402
from .prepare import prepare  # noqa: E402
from .rundir import Run  # noqa: E402
from .train import finetune, resume  # noqa: E402

__all__ = ["Classifier", "Completion", "Model", "Run", "TunesmithError", "finetune", "finetune_classifier", "load",
           "prepare", "resume", "__version__"]

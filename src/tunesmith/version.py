"""The package version, in a module of its own so that any module can import it without a loop."""

__version__ = "0.1.0"


def library_versions() -> dict:
    """The versions a run was made with, recorded in its config.json."""
    import platform

    import peft
    import torch
    import transformers

    return {"tunesmith": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}

"""gptfast: a lean GPT-2-class trainer for one consumer GPU."""

__version__ = "0.1.0"


def _check_kernels_package() -> None:
    """ImportError naming the problem when the top-level package `kernels` that Python finds is not
    gptfast's kernels/ (Hugging Face's `kernels` distribution has the same import name; transformers
    5.25 and later install it): every Triton op would otherwise fail later, obscurely."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("kernels")
    ours = Path(__file__).resolve().parents[1] / "kernels" / "__init__.py"
    found = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    if found is not None and found != ours:
        raise ImportError(f"gptfast: the package `kernels` Python imports is {found}, not gptfast's {ours}: another "
                          "distribution named `kernels` (Hugging Face's, which transformers>=5.25 requires) shadows "
                          "it; `pip uninstall kernels` (and keep transformers<5.25), or run from gptfast's checkout")


_check_kernels_package()

"""lmforge: a self-hosted LLM engine with an OpenAI-compatible API.

Offline use::

    from lmforge import LLM, SamplingParams
    llm = LLM("smollm2-135m-instruct")
    print(llm.generate(["The capital of France is"], SamplingParams(max_tokens=16))[0].text)

Names are imported lazily so that ``import lmforge`` stays light (no torch until needed).
"""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from lmforge.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from lmforge.engine.request import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")

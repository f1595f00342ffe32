"""Plots of simulated pipelines and stage profiles, saved as PNG.

- :func:`plot_timeline`: Gantt chart of one simulated iteration, bars coloured by SM frequency.
- :func:`plot_profile`: time and energy against frequency per stage, Pareto-optimal clocks marked.
- :func:`plot_frontier`: energy against iteration time for every plan of a frontier.

Matplotlib is imported only when a plot is drawn, and only through :class:`matplotlib.figure.Figure`
(never ``pyplot``), so importing this package is cheap and leaves no global figure state.
"""

from perseus_lightning.plots.frontier import plot_frontier
from perseus_lightning.plots.profile_curves import plot_profile
from perseus_lightning.plots.timeline import plot_timeline

__all__ = ["plot_frontier", "plot_profile", "plot_timeline"]

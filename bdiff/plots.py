"""PNG figures like the paper's Figures 1-3: data, scalar field, gradient field, samples."""
import os

import numpy as np

from bdiff.errors import BdiffError
from bdiff.metrics import field_grid

PANELS = ("data", "scalar_field", "gradient_field", "samples")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_plots(folder, model, data, samples, item_shape=None, law=None):
    """Write one PNG per panel and an overview.png; returns the paths written."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise BdiffError(f"cannot create plot folder {folder}: {err.strerror}")
    if not os.access(folder, os.W_OK):
        raise BdiffError(f"cannot write plots: folder {folder} is not writable")
    plt = _pyplot()
    dim = data.shape[1]
    if dim > 2:
        if item_shape is None or len(item_shape) < 2:
            raise BdiffError(f"--plot draws 1-D and 2-D data, or images; this data is {dim}-D")
        return _image_grids(plt, folder, data, samples, item_shape)
    draw = _draw_1d if dim == 1 else _draw_2d
    paths = []
    fig_all, axes_all = plt.subplots(1, 4, figsize=(18, 4.4))
    for ax, panel in zip(axes_all, PANELS):
        draw(ax, panel, model, data, samples, law)
    for panel in PANELS:
        fig, ax = plt.subplots(figsize=(5, 4.4))
        draw(ax, panel, model, data, samples, law)
        paths.append(_save(plt, fig, folder, panel))
    paths.append(_save(plt, fig_all, folder, "overview"))
    return paths


def _save(plt, fig, folder, name):
    path = os.path.join(folder, f"{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_1d(ax, panel, model, data, samples, law):
    axes, grid = field_grid(np.concatenate([data, samples[: len(data)]]), points=600)
    if panel in ("data", "samples"):
        values = data if panel == "data" else samples
        ax.hist(values[:, 0], bins=120, density=True, color="tab:blue" if panel == "data" else "tab:green")
        ax.set_title("training data" if panel == "data" else f"samples (n={len(samples)})")
        return
    density, gradient = model.fields_in_data_units(grid.astype(np.float32))
    if panel == "scalar_field":
        ax.plot(axes[0], density, label="scalar field s(x)")
        if law is not None:
            ax.plot(axes[0], law.smoothed_density(grid, model.eps * model.standardizer.std**2),
                    "--", label="true p_ε")
        ax.set_title("scalar field ≈ p(x)")
    else:
        ax.plot(axes[0], gradient[:, 0], color="tab:red", label="gradient field g(x)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title("gradient field ≈ p'(x)")
    ax.legend(fontsize=8)


def _draw_2d(ax, panel, model, data, samples, law):
    if panel in ("data", "samples"):
        values = data if panel == "data" else samples
        ax.scatter(values[:, 0], values[:, 1], s=1, alpha=0.4,
                   color="tab:blue" if panel == "data" else "tab:green")
        ax.set_title("training data" if panel == "data" else f"samples (n={len(samples)})")
        ax.set_aspect("equal", adjustable="datalim")
        return
    axes, grid = field_grid(data, points=160 if panel == "scalar_field" else 28)
    density, gradient = model.fields_in_data_units(grid.astype(np.float32))
    shape = (len(axes[0]), len(axes[1]))
    if panel == "scalar_field":
        image = ax.imshow(density.reshape(shape).T, origin="lower", cmap="viridis", aspect="auto",
                          extent=(axes[0][0], axes[0][-1], axes[1][0], axes[1][-1]))
        ax.figure.colorbar(image, ax=ax, fraction=0.046)
        ax.set_title("scalar field ≈ p(x)")
    else:
        gx, gy = gradient[:, 0].reshape(shape), gradient[:, 1].reshape(shape)
        X, Y = np.meshgrid(axes[0], axes[1], indexing="ij")
        norm = np.hypot(gx, gy)
        # arrow length ∝ sqrt(‖g‖) so the small modes stay visible beside the large one
        length = np.sqrt(norm / max(norm.max(), 1e-30)) / np.maximum(norm, 1e-30)
        ax.quiver(X, Y, gx * length, gy * length, norm, cmap="magma", angles="xy", scale=30)
        ax.set_title("gradient field ≈ ∇p(x)")
        ax.set_aspect("equal", adjustable="datalim")


def _image_grids(plt, folder, data, samples, item_shape):
    return [plot_image_grid(os.path.join(folder, f"{name}.png"), values, item_shape,
                            "training data" if name == "data" else "samples")
            for name, values in (("data", data), ("samples", samples))]


def plot_image_grid(path, values, item_shape, title, count=64):
    """The first `count` rows drawn as images (first channel of C x H x W items)."""
    plt = _pyplot()
    images = values[:count].reshape(-1, *item_shape)
    if len(item_shape) == 3:
        images = images[:, 0]
    side = int(np.ceil(np.sqrt(len(images))))
    fig, axes = plt.subplots(side, side, figsize=(side * 0.9, side * 0.9))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, image in zip(np.ravel(axes), images):
        ax.imshow(image, cmap="gray_r")
    fig.suptitle(title)
    folder, name = os.path.split(path)
    return _save(plt, fig, folder or ".", os.path.splitext(name)[0])

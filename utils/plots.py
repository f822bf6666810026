"""The bit allocation as a picture: MoE layers x experts, each cell coloured by the expert's
width and labelled with it, its rank in the layer's order and the score the order used."""
from __future__ import annotations

# The score each order ranks by (random orders have none: the rank is shown alone).
ORDER_SCORE = {"router": "router_norm", "reverse_router": "router_norm", "combined": "router_norm",
               "variance": "max_var", "frequency": "tokens", "routing_weight": "routing_weight"}
WIDTH_COLOURS = {1: "#d7301f", 2: "#fc8d59", 3: "#91cf60", 4: "#1a9850", 8: "#4575b4"}


def allocation_png(allocation: dict, path: str) -> None:
    """Write ``path`` (PNG) from a bit_allocation.json dict."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    layers = allocation["layers"]
    n_exp = max(len(layer["bits"]) for layer in layers)
    widths = sorted({b for layer in layers for b in layer["bits"]})
    index = {b: i for i, b in enumerate(widths)}
    grid = [[index[b] for b in layer["bits"]] + [float("nan")] * (n_exp - len(layer["bits"])) for layer in layers]
    score_name = ORDER_SCORE.get(allocation.get("order_type"))
    cell = 0.55 if n_exp <= 16 else 0.25
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + cell * n_exp), max(2.2, 1.3 + 0.5 * len(layers))))
    ax.imshow(grid, cmap=ListedColormap([WIDTH_COLOURS.get(b, "#999999") for b in widths]), aspect="auto",
              vmin=-0.5, vmax=len(widths) - 0.5)
    if n_exp <= 16:
        for i, layer in enumerate(layers):
            rank = {e: r for r, e in enumerate(layer["expert_order"])}
            for e, b in enumerate(layer["bits"]):
                label = f"{b}\n#{rank[e]}"
                if score_name and score_name in layer["scores"]:
                    label += f"\n{_short(layer['scores'][score_name][e])}"
                ax.text(e, i, label, ha="center", va="center", fontsize=7)
    ax.set_xticks(range(n_exp) if n_exp <= 32 else range(0, n_exp, 8))
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([layer["name"] for layer in layers], fontsize=7)
    ax.set_xlabel("expert" + ("" if n_exp > 16 else f"  (cell: bits, #rank in the order"
                                                    f"{', ' + score_name if score_name else ''})"))
    target = allocation.get("target_avg_bits")
    ax.set_title(f"bits per expert: order {allocation.get('order_type')}, average {allocation['avg_bits']:.3f}"
                 + (f" (target {target})" if target is not None else ""), fontsize=9)
    ax.legend(handles=[Patch(color=WIDTH_COLOURS.get(b, "#999999"), label=f"{b} bits") for b in widths],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(v: float) -> str:
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v))
    return f"{v:.3g}"

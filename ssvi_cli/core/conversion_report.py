"""What :func:`ssvi_cli.sparsify` returns: each converted layer's geometry, support size and
posterior, and the layers it left as they were with the reason, as a table (``str``) or a dict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class ConvertedLayer:
    name: str
    kind: str
    shape: tuple[int, ...]
    active: int
    total: int
    bayesian: bool
    dense: bool

    @property
    def density(self) -> float:
        return self.active / self.total


@dataclass
class ConversionReport:
    """What :func:`sparsify` converted (per layer) and what it left alone (with the reason)."""

    layers: list[ConvertedLayer] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)
    # Said to the report taken for the model (``model = ssvi.sparsify(model)``): by a module's attribute asked
    # of it, and where predict, save, param_groups or kl_term look for the model's sparse layers.
    TAKEN_FOR_THE_MODEL: ClassVar[str] = (": ssvi_cli.sparsify converts the model in place and returns this report of "
                                          "it; pass the model itself")

    @property
    def density(self) -> float:
        total = sum(l.total for l in self.layers)
        return sum(l.active for l in self.layers) / total if total else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"density": self.density, "layers": [dict(asdict(l), density=l.density) for l in self.layers],
                "kept": [{"name": n, "reason": r} for n, r in self.kept]}

    def __repr__(self) -> str:  # a summary, as a notebook shows a cell's value: print(report) gives the table
        return (f"ConversionReport({len(self.layers)} layer{'' if len(self.layers) == 1 else 's'} converted, density {self.density:.4f} over "
                f"{sum(l.total for l in self.layers):,} weights, {len(self.kept)} kept as {'it is' if len(self.kept) == 1 else 'they are'}; print() it for the table)")

    def __str__(self) -> str:
        rows = [("layer", "kind", "shape", "active / total", "density", "posterior")]
        for l in self.layers:
            rows.append((l.name, l.kind, "x".join(map(str, l.shape)), f"{l.active:,} / {l.total:,}",
                         f"{l.density:.4f}", ("Bayesian" if l.bayesian else "deterministic") + (", dense" if l.dense else "")))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        # Over the converted layers' weights: layers kept as is (below) are not counted.
        lines.append(f"{len(self.layers)} layer{'' if len(self.layers) == 1 else 's'} converted, density {self.density:.4f} over their "
                     f"{sum(l.total for l in self.layers):,} weights")
        lines += [f"kept as is: {n or '(the model itself)'} ({r})" for n, r in self.kept]
        return "\n".join(lines)

    def __getattr__(self, name: str) -> Any:
        """Only for attributes a report lacks: a module's (``named_modules``, ``eval``, ``training``, a
        submodule's name), asked of the report taken for the model (``model = ssvi.sparsify(model)``), say
        what to pass; a near miss of the report's own is Python's own error (with its "Did you mean")."""
        from difflib import get_close_matches

        if name.startswith("__") or get_close_matches(name, [k for k in dir(type(self)) if not k.startswith("_")] +
                                                      ["layers", "kept"], n=1, cutoff=0.75):
            # copy and pickle look-ups; a typo of the report's own (``layer``): Python's error and "Did you mean"
            raise AttributeError(f"'ConversionReport' object has no attribute {name!r}", name=name, obj=self)
        raise AttributeError(f"'ConversionReport' object has no attribute {name!r}{self.TAKEN_FOR_THE_MODEL}")

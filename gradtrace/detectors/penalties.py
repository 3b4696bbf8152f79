"""``penalties``: the regularisers, not the data, drive the loss, and pull the weights toward zero."""

from __future__ import annotations

from gradtrace.detectors.base import Detector, describe

# regulariser attribute -> the weight it applies to (Keras layers' constructor arguments)
REGULARISED = {
    "kernel_regularizer": "kernel", "bias_regularizer": "bias", "embeddings_regularizer": "embeddings",
    "recurrent_regularizer": "recurrent_kernel", "depthwise_regularizer": "depthwise_kernel",
    "pointwise_regularizer": "pointwise_kernel", "gamma_regularizer": "gamma", "beta_regularizer": "beta",
}


class Penalties(Detector):
    """What every healthy run keeps: the data drives the loss. At each epoch's end, fires once per fit when
    the weight penalties (``kernel_regularizer`` and its kin, computed on the weights) make up more than
    ``share`` (default 0.5) of the epoch's mean loss, and the regularised weights have shrunk below
    ``shrink`` (default 0.7) of their norm at the start of the fit: the optimizer spends the updates on
    the penalty, and the weights head for zero (a model that predicts a constant). A healthy L2 of 1e-4
    to 1e-3 is a few percent of the loss, and training grows the weights from their initialisation.

    Blame rule: the layer whose regulariser contributes the most, with the regulariser and its factor.
    """

    name = "penalties"
    default_action = "warn"
    needs = ()
    reports_at = ("epoch_end",)

    def __init__(self, share=0.5, shrink=0.7, action=None):
        super().__init__(action)
        self.share = self.check_range("share", share, 0.0, 1.0, low_open=True, high_open=True)
        self.shrink = self.check_range("shrink", shrink, 0.0, 1.0, low_open=True, high_open=True)
        self._start = None
        self._done = False

    def reset(self):
        super().reset()
        self._start, self._done = None, False

    @staticmethod
    def _terms(ctx):
        """``[(path, attribute, regulariser, variable)]`` of the run's trainable layers."""
        tap = ctx.tap
        out = []
        for lid, layer in tap.layers.items():
            if not layer.trainable:
                continue
            for attr, weight in REGULARISED.items():
                reg, var = getattr(layer, attr, None), getattr(layer, weight, None)
                if reg is not None and var is not None and getattr(var, "trainable", False) and callable(reg):
                    out.append((tap.paths.get(lid, layer.name), attr, reg, var))
        return sorted(out, key=lambda t: (t[0], t[1]))

    @staticmethod
    def _norm(terms):
        import tensorflow as tf

        seen, total = set(), 0.0
        for _, _, _, var in terms:
            if id(var) not in seen:
                seen.add(id(var))
                total += float(tf.reduce_sum(tf.square(tf.cast(var, tf.float32))))
        return total ** 0.5

    def epoch_begin(self, ctx):
        if self._start is None:
            terms = self._terms(ctx)
            self._start = self._norm(terms) if terms else 0.0

    def epoch_end(self, ctx):
        import tensorflow as tf

        loss = ctx.epoch_logs.get("loss")
        if self._done or loss is None or not self._start:
            return
        terms = self._terms(ctx)
        if not terms:
            return
        values = [(path, attr, reg, float(tf.cast(reg(var), tf.float32))) for path, attr, reg, var in terms]
        penalty, loss = sum(v for *_, v in values), float(loss)
        now = self._norm(terms)
        if not (loss > 0 and penalty / loss > self.share and now < self.shrink * self._start):
            return
        self._done = True
        path, attr, reg, top = max(values, key=lambda t: t[3])
        others = len(values) - 1
        yield path, "weight", penalty / loss, (
            f"{path}: the weight penalties make up {penalty / loss:.0%} of the loss ({penalty:.4g} of {loss:.4g}) "
            f"and the regularised weights have shrunk to {now / self._start:.0%} of their norm at the start: the "
            f"regularisers, not the data, drive training. The largest term is {path}'s {attr} {describe(reg)} "
            f"({top:.4g}){f', of {others + 1}' if others else ''}."
        ), ("lower the regularisation factor (an L2 of 1e-4 to 1e-3 is usual) or remove it; a penalty that "
            "outweighs the data loss pulls every weight to 0 and the model toward a constant output.")

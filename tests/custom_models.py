"""Models with their own ``train_step``, ported from the Keras examples onto small synthetic data.

- ``GAN``: keras.io/examples/generative/dcgan_overriding_train_step (Keras 3):
  a generator and a discriminator (both nested models), two tapes and two
  optimizers in one step, ``Mean`` trackers for both losses. Dense instead of
  convolutions, and the label noise drawn from the model's seed generator
  (the example's ``tf.random.uniform`` is unseeded) so that two runs match.
- ``VAE``: keras.io/examples/generative/vae (Keras 3): an encoder with a
  sampling layer, a decoder, three ``Mean`` trackers; the KL term goes through
  ``add_loss`` in the sampling layer (``self.losses``), as in the
  ``tf.keras`` version of the example.

``FaultAt`` turns its input into NaN (or scales it) while an optimizer's
``iterations`` equals ``at``: a fault at a known step, independent of how
many times the layer is called per step and of the ``training`` flag.
"""

import keras
import numpy as np
from keras import layers, ops


class FaultAt(layers.Layer):
    def __init__(self, at, clock, value=float("nan"), **kw):
        super().__init__(**kw)
        self.at = at
        self.clock = clock  # a function returning the optimizer whose iterations is the clock
        self.value = value

    def compute_output_shape(self, shape):
        return shape

    def call(self, x):
        now = ops.cast(self.clock().iterations, "float32")
        return x * ops.cast(ops.where(ops.equal(now, float(self.at)), self.value, 1.0), x.dtype)


class GAN(keras.Model):
    def __init__(self, latent_dim=4, features=6, fault_at=None, fault_value=float("nan"), d_activation="sigmoid"):
        super().__init__(name="gan")
        self.latent_dim = latent_dim
        gen_layers = [keras.Input((latent_dim,)), layers.Dense(16, activation="relu", name="g_hidden")]
        if fault_at is not None:
            gen_layers.append(FaultAt(fault_at, lambda: self.g_optimizer, fault_value, name="faulty"))
        gen_layers.append(layers.Dense(features, name="g_out"))
        self.generator = keras.Sequential(gen_layers, name="generator")
        self.discriminator = keras.Sequential([
            keras.Input((features,)), layers.Dense(16, activation="relu", name="d_hidden"),
            layers.Dense(1, activation=d_activation, name="d_out")], name="discriminator")
        self.seed_generator = keras.random.SeedGenerator(1337)

    def compile(self, d_optimizer, g_optimizer, loss_fn):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        self.loss_fn = loss_fn
        self.d_loss_metric = keras.metrics.Mean(name="d_loss")
        self.g_loss_metric = keras.metrics.Mean(name="g_loss")

    @property
    def metrics(self):
        return [self.d_loss_metric, self.g_loss_metric]

    def call(self, z):
        return self.discriminator(self.generator(z))

    def train_step(self, real):
        import tensorflow as tf

        if isinstance(real, tuple):
            real = real[0]
        batch_size = ops.shape(real)[0]
        latent = keras.random.normal((batch_size, self.latent_dim), seed=self.seed_generator)
        fake = self.generator(latent)
        combined = ops.concatenate([fake, real], axis=0)
        labels = ops.concatenate([ops.ones((batch_size, 1)), ops.zeros((batch_size, 1))], axis=0)
        labels += 0.05 * keras.random.uniform(ops.shape(labels), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            predictions = self.discriminator(combined)
            d_loss = self.loss_fn(labels, predictions)
        grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
        self.d_optimizer.apply_gradients(zip(grads, self.discriminator.trainable_weights))

        latent = keras.random.normal((batch_size, self.latent_dim), seed=self.seed_generator)
        misleading = ops.zeros((batch_size, 1))
        with tf.GradientTape() as tape:
            predictions = self.discriminator(self.generator(latent))
            g_loss = self.loss_fn(misleading, predictions)
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_weights))

        self.d_loss_metric.update_state(d_loss)
        self.g_loss_metric.update_state(g_loss)
        return {"d_loss": self.d_loss_metric.result(), "g_loss": self.g_loss_metric.result()}


def gan(fault_at=None, fault_value=float("nan"), d_activation="sigmoid"):
    """``d_activation=None``: a linear discriminator feeding ``BinaryCrossentropy(from_logits=False)``."""
    keras.utils.set_random_seed(7)
    m = GAN(fault_at=fault_at, fault_value=fault_value, d_activation=d_activation)
    m.compile(d_optimizer=keras.optimizers.Adam(1e-3), g_optimizer=keras.optimizers.Adam(1e-3),
              loss_fn=keras.losses.BinaryCrossentropy())
    m(ops.zeros((1, m.latent_dim)))  # build both nested models
    return m


def gan_data(n=96, features=6, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, features)) * 0.5 + 1.0).astype("float32")


class Sampling(layers.Layer):
    """z = mean + exp(log_var / 2) * eps; adds the KL divergence with ``add_loss``."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seed_generator = keras.random.SeedGenerator(1337)

    def call(self, inputs):
        z_mean, z_log_var = inputs
        eps = keras.random.normal(ops.shape(z_mean), seed=self.seed_generator)
        kl = -0.5 * (1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var))
        self.add_loss(ops.mean(ops.sum(kl, axis=1)))
        return z_mean + ops.exp(0.5 * z_log_var) * eps


class VAE(keras.Model):
    def __init__(self, features=8, latent=2, fault_at=None, fault_value=float("nan")):
        super().__init__(name="vae")
        x = keras.Input((features,))
        h = layers.Dense(16, activation="relu", name="e_hidden")(x)
        if fault_at is not None:
            h = FaultAt(fault_at, lambda: self.optimizer, fault_value, name="faulty")(h)
        z_mean = layers.Dense(latent, name="z_mean")(h)
        z_log_var = layers.Dense(latent, name="z_log_var")(h)
        z = Sampling(name="sampling")([z_mean, z_log_var])
        self.encoder = keras.Model(x, [z_mean, z_log_var, z], name="encoder")
        d_in = keras.Input((latent,))
        d_h = layers.Dense(16, activation="relu", name="d_hidden")(d_in)
        self.decoder = keras.Model(d_in, layers.Dense(features, activation="sigmoid", name="d_out")(d_h),
                                   name="decoder")
        self.total_loss_tracker = keras.metrics.Mean(name="total_loss")
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")

    @property
    def metrics(self):
        return [self.total_loss_tracker, self.reconstruction_loss_tracker, self.kl_loss_tracker]

    def call(self, x):
        return self.decoder(self.encoder(x)[2])

    def train_step(self, data):
        import tensorflow as tf

        if isinstance(data, tuple):
            data = data[0]
        with tf.GradientTape() as tape:
            z_mean, z_log_var, z = self.encoder(data)
            reconstruction = self.decoder(z)
            reconstruction_loss = ops.mean(ops.sum(keras.losses.binary_crossentropy(
                data[..., None], reconstruction[..., None]), axis=1))
            kl_loss = ops.sum(self.encoder.losses)
            total_loss = reconstruction_loss + kl_loss
        grads = tape.gradient(total_loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        self.total_loss_tracker.update_state(total_loss)
        self.reconstruction_loss_tracker.update_state(reconstruction_loss)
        self.kl_loss_tracker.update_state(kl_loss)
        return {m.name: m.result() for m in self.metrics}


def vae(fault_at=None, fault_value=float("nan")):
    keras.utils.set_random_seed(11)
    m = VAE(fault_at=fault_at, fault_value=fault_value)
    m.compile(optimizer=keras.optimizers.Adam(1e-3))
    m(ops.zeros((1, 8)))
    return m


def vae_data(n=96, features=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, features)) > 0.5).astype("float32")

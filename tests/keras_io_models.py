"""Published keras-io programs, ported at small sizes onto synthetic data made here (nothing downloaded).

Each port keeps the example's layer structure, losses and training step; only the sizes (and the data)
are shrunk. Every builder seeds Keras first, so that two calls build the same model with the same weights
(one for ``gradtrace.fit``, one for ``model.fit``).

- ``translation_transformer``: https://keras.io/examples/nlp/neural_machine_translation_with_transformer/
  (fchollet, Keras 3 version): ``PositionalEmbedding`` (token Embedding + position Embedding, padding mask
  from id 0), ``TransformerEncoder``, ``TransformerDecoder`` (causal self-attention, then cross-attention
  over the encoder's output), Dropout(0.5), a softmax Dense; rmsprop and
  ``SparseCategoricalCrossentropy(ignore_class=0)``. Sizes: vocab 50, sequence 8, embed 16, latent 32,
  2 heads (the example: 15000, 20, 256, 2048, 8).
- ``distiller``: https://keras.io/examples/vision/knowledge_distillation/ (Kenneth Borup): a teacher CNN
  trained first with its own ``fit``, then a ``Distiller(keras.Model)`` whose ``train_step`` (the
  example's, before its Keras 3 conversion moved it into ``compute_loss``) runs the teacher outside the
  tape and updates the student only, with a student loss plus a KL distillation loss at a temperature.
  Images 8x8x1 (the example: MNIST 28x28x1), teacher filters 16/32 (256/512), student 4/8 (16/32).
- ``wgan_gp``: https://keras.io/examples/generative/wgan_gp/ (A_K_Nain): a conv critic (ZeroPadding2D,
  four strided 5x5 Conv2D + LeakyReLU(0.2), two Dropout(0.3), Flatten, Dropout(0.2), Dense(1)), an
  upsampling generator (Dense, BatchNorm, LeakyReLU, three UpSampling2D + Conv2D + BatchNorm blocks, tanh,
  Cropping2D); ``train_step`` trains the critic ``d_steps`` (3) times per generator step, with the
  gradient penalty from an inner ``GradientTape`` on interpolated images. Images 8x8x1 (padded to 16x16,
  the example pads 28 to 32), filters 8/16/32/64 (64/128/256/512), noise 16 (128).
- ``deep_relu_mlp``: not a keras-io program: a deep ReLU MLP with the Keras default initialisation,
  SGD(learning_rate=3.0) on regression targets of scale 100: healthy at initialisation, blown up by
  its first update.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

# -- English-to-Spanish translation with a sequence-to-sequence Transformer ------------------------------
# https://keras.io/examples/nlp/neural_machine_translation_with_transformer/

VOCAB, SEQ, EMBED, LATENT, HEADS = 50, 8, 16, 32, 2


class TransformerEncoder(layers.Layer):
    def __init__(self, embed_dim, dense_dim, num_heads, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim = embed_dim
        self.dense_dim = dense_dim
        self.num_heads = num_heads
        self.attention = layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.dense_proj = keras.Sequential(
            [layers.Dense(dense_dim, activation="relu"), layers.Dense(embed_dim)]
        )
        self.layernorm_1 = layers.LayerNormalization()
        self.layernorm_2 = layers.LayerNormalization()
        self.supports_masking = True

    def call(self, inputs, mask=None):
        if mask is not None:
            padding_mask = ops.cast(mask[:, None, :], dtype="int32")
        else:
            padding_mask = None
        attention_output = self.attention(query=inputs, value=inputs, key=inputs, attention_mask=padding_mask)
        proj_input = self.layernorm_1(inputs + attention_output)
        proj_output = self.dense_proj(proj_input)
        return self.layernorm_2(proj_input + proj_output)


class PositionalEmbedding(layers.Layer):
    def __init__(self, sequence_length, vocab_size, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.token_embeddings = layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.position_embeddings = layers.Embedding(input_dim=sequence_length, output_dim=embed_dim)
        self.sequence_length = sequence_length
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim

    def call(self, inputs):
        length = ops.shape(inputs)[-1]
        positions = ops.arange(0, length, 1)
        embedded_tokens = self.token_embeddings(inputs)
        embedded_positions = self.position_embeddings(positions)
        return embedded_tokens + embedded_positions

    def compute_mask(self, inputs, mask=None):
        return ops.not_equal(inputs, 0)


class TransformerDecoder(layers.Layer):
    def __init__(self, embed_dim, latent_dim, num_heads, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim = embed_dim
        self.latent_dim = latent_dim
        self.num_heads = num_heads
        self.attention_1 = layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.attention_2 = layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.dense_proj = keras.Sequential(
            [layers.Dense(latent_dim, activation="relu"), layers.Dense(embed_dim)]
        )
        self.layernorm_1 = layers.LayerNormalization()
        self.layernorm_2 = layers.LayerNormalization()
        self.layernorm_3 = layers.LayerNormalization()
        self.supports_masking = True

    def call(self, inputs, mask=None):
        inputs, encoder_outputs = inputs
        causal_mask = self.get_causal_attention_mask(inputs)
        if mask is None:
            inputs_padding_mask, encoder_outputs_padding_mask = None, None
        else:
            inputs_padding_mask, encoder_outputs_padding_mask = mask
        attention_output_1 = self.attention_1(
            query=inputs, value=inputs, key=inputs, attention_mask=causal_mask, query_mask=inputs_padding_mask
        )
        out_1 = self.layernorm_1(inputs + attention_output_1)
        attention_output_2 = self.attention_2(
            query=out_1, value=encoder_outputs, key=encoder_outputs,
            query_mask=inputs_padding_mask, key_mask=encoder_outputs_padding_mask,
        )
        out_2 = self.layernorm_2(out_1 + attention_output_2)
        proj_output = self.dense_proj(out_2)
        return self.layernorm_3(out_2 + proj_output)

    def get_causal_attention_mask(self, inputs):
        # the example's TensorFlow version of this method: under Keras 3.14 its keras.ops version fails
        # to build symbolically (ops.tile iterates over a tensor of repeats)
        input_shape = tf.shape(inputs)
        batch_size, sequence_length = input_shape[0], input_shape[1]
        i = tf.range(sequence_length)[:, tf.newaxis]
        j = tf.range(sequence_length)
        mask = tf.cast(i >= j, dtype="int32")
        mask = tf.reshape(mask, (1, input_shape[1], input_shape[1]))
        mult = tf.concat([tf.expand_dims(batch_size, -1), tf.constant([1, 1], dtype=tf.int32)], axis=0)
        return tf.tile(mask, mult)


def translation_transformer(seed=0):
    keras.utils.set_random_seed(seed)
    sequence_length, vocab_size, embed_dim, latent_dim, num_heads = SEQ, VOCAB, EMBED, LATENT, HEADS
    encoder_inputs = keras.Input(shape=(None,), dtype="int64", name="encoder_inputs")
    x = PositionalEmbedding(sequence_length, vocab_size, embed_dim)(encoder_inputs)
    encoder_outputs = TransformerEncoder(embed_dim, latent_dim, num_heads)(x)

    decoder_inputs = keras.Input(shape=(None,), dtype="int64", name="decoder_inputs")
    x = PositionalEmbedding(sequence_length, vocab_size, embed_dim)(decoder_inputs)
    x = TransformerDecoder(embed_dim, latent_dim, num_heads)([x, encoder_outputs])
    x = layers.Dropout(0.5)(x)
    decoder_outputs = layers.Dense(vocab_size, activation="softmax")(x)
    # (the example also wraps the encoder and the decoder in models of their own, for inference; the model
    # it trains is this one, built from the whole graph)
    transformer = keras.Model(
        {"encoder_inputs": encoder_inputs, "decoder_inputs": decoder_inputs}, decoder_outputs, name="transformer"
    )
    transformer.compile(
        "rmsprop", loss=keras.losses.SparseCategoricalCrossentropy(ignore_class=0), metrics=["accuracy"]
    )
    return transformer


def translation_data(n=96, seed=0):
    """Pairs of "sentences" of ids in [3, VOCAB) padded with 0 to SEQ + 1 tokens, the target the source
    reversed between a start (1) and an end (2) token; then the example's ``format_dataset``:
    ``({"encoder_inputs": eng, "decoder_inputs": spa[:, :-1]}, spa[:, 1:])``."""
    rng = np.random.default_rng(seed)
    eng = np.zeros((n, SEQ), "int64")
    spa = np.zeros((n, SEQ + 1), "int64")
    for k in range(n):
        length = int(rng.integers(3, SEQ - 1))
        words = rng.integers(3, VOCAB, length)
        eng[k, :length] = words
        spa[k, : length + 2] = np.concatenate([[1], words[::-1], [2]])
    return {"encoder_inputs": eng, "decoder_inputs": spa[:, :-1]}, spa[:, 1:]


# -- Knowledge distillation ------------------------------------------------------------------------------
# https://keras.io/examples/vision/knowledge_distillation/

IMAGE = (8, 8, 1)


class _DistillerBase(keras.Model):
    """The example's constructor and ``compile``, shared by its two forms below."""

    def __init__(self, student, teacher):
        super().__init__()
        self.teacher = teacher
        self.student = student

    def compile(self, optimizer, metrics, student_loss_fn, distillation_loss_fn, alpha=0.1, temperature=3):
        super().compile(optimizer=optimizer, metrics=metrics)
        self.student_loss_fn = student_loss_fn
        self.distillation_loss_fn = distillation_loss_fn
        self.alpha = alpha
        self.temperature = temperature

    def call(self, x):
        return self.student(x)


class Distiller(_DistillerBase):
    """The example's ``train_step`` form (before its Keras 3 conversion)."""

    def train_step(self, data):
        x, y = data
        # Forward pass of teacher
        teacher_predictions = self.teacher(x, training=False)
        with tf.GradientTape() as tape:
            # Forward pass of student
            student_predictions = self.student(x, training=True)
            # Compute losses
            student_loss = self.student_loss_fn(y, student_predictions)
            distillation_loss = (
                self.distillation_loss_fn(
                    tf.nn.softmax(teacher_predictions / self.temperature, axis=1),
                    tf.nn.softmax(student_predictions / self.temperature, axis=1),
                )
                * self.temperature**2
            )
            loss = self.alpha * student_loss + (1 - self.alpha) * distillation_loss
        # Compute gradients
        trainable_vars = self.student.trainable_variables
        gradients = tape.gradient(loss, trainable_vars)
        # Update weights
        self.optimizer.apply_gradients(zip(gradients, trainable_vars))
        # Update the metrics configured in `compile()`.
        for metric in self.metrics:
            if metric.name != "loss":
                metric.update_state(y, student_predictions)
        results = {m.name: m.result() for m in self.metrics if m.name != "loss"}
        results.update({"student_loss": student_loss, "distillation_loss": distillation_loss})
        return results


def _cnn(filters, name):
    return keras.Sequential(
        [
            keras.Input(shape=IMAGE),
            layers.Conv2D(filters[0], (3, 3), strides=(2, 2), padding="same"),
            layers.LeakyReLU(negative_slope=0.2),
            layers.MaxPooling2D(pool_size=(2, 2), strides=(1, 1), padding="same"),
            layers.Conv2D(filters[1], (3, 3), strides=(2, 2), padding="same"),
            layers.Flatten(),
            layers.Dense(10),
        ],
        name=name,
    )


def digits_data(n=128, seed=0):
    """Ten classes of 8x8 images in [0, 1]: a class is a bright 2x2 patch at one of ten places, on noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype("int64")
    x = (0.2 * rng.random((n,) + IMAGE)).astype("float32")
    for k, c in enumerate(y):
        r, col = divmod(int(c), 4)
        x[k, 2 * r: 2 * r + 2, 2 * col: 2 * col + 2, 0] += 0.8
    return x, y


def distiller(seed=0, teacher_epochs=3, form=None, freeze_teacher=False):
    """The teacher trained as usual (its own fit: Adam, sparse crossentropy from logits), then the distiller
    (``form``: :class:`Distiller` by default) compiled as in the example (alpha 0.1, temperature 10)."""
    keras.utils.set_random_seed(seed)
    teacher = _cnn((16, 32), "teacher")
    student = _cnn((4, 8), "student")
    x, y = digits_data(seed=seed + 1)
    teacher.compile(
        optimizer=keras.optimizers.Adam(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    teacher.fit(x, y, epochs=teacher_epochs, batch_size=16, verbose=0)
    teacher.trainable = not freeze_teacher
    d = (form or Distiller)(student=student, teacher=teacher)
    d.compile(
        optimizer=keras.optimizers.Adam(),
        metrics=[keras.metrics.SparseCategoricalAccuracy()],
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        distillation_loss_fn=keras.losses.KLDivergence(),
        alpha=0.1,
        temperature=10,
    )
    return d


class Distiller3(_DistillerBase):
    """The example's Keras 3 version: the teacher runs in ``compute_loss``, inside fit's own tape."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, allow_empty=False):
        teacher_pred = self.teacher(x, training=False)
        student_loss = self.student_loss_fn(y, y_pred)
        distillation_loss = self.distillation_loss_fn(
            ops.softmax(teacher_pred / self.temperature, axis=1),
            ops.softmax(y_pred / self.temperature, axis=1),
        ) * (self.temperature**2)
        return self.alpha * student_loss + (1 - self.alpha) * distillation_loss


def distiller3(seed=0, teacher_epochs=3, freeze_teacher=True):
    """``distiller`` in its Keras 3 form (``compute_loss``); the teacher frozen (``trainable=False``) after
    its own training, as knowledge distillation assumes ("the teacher is trained and fixed")."""
    return distiller(seed, teacher_epochs, form=Distiller3, freeze_teacher=freeze_teacher)


# -- WGAN-GP overriding Model.train_step ------------------------------------------------------------------
# https://keras.io/examples/generative/wgan_gp/

GAN_IMAGE = (8, 8, 1)
NOISE_DIM = 16


def conv_block(x, filters, activation, kernel_size=(3, 3), strides=(1, 1), padding="same", use_bias=True,
               use_bn=False, use_dropout=False, drop_value=0.5):
    x = layers.Conv2D(filters, kernel_size, strides=strides, padding=padding, use_bias=use_bias)(x)
    if use_bn:
        x = layers.BatchNormalization()(x)
    x = activation(x)
    if use_dropout:
        x = layers.Dropout(drop_value)(x)
    return x


def get_discriminator_model():
    img_input = layers.Input(shape=GAN_IMAGE)
    # Zero pad the input to 16x16 (the example: 28x28 to 32x32), for four stride-2 convolutions
    x = layers.ZeroPadding2D((4, 4))(img_input)
    x = conv_block(x, 8, kernel_size=(5, 5), strides=(2, 2), use_bn=False, use_bias=True,
                   activation=layers.LeakyReLU(0.2), use_dropout=False, drop_value=0.3)
    x = conv_block(x, 16, kernel_size=(5, 5), strides=(2, 2), use_bn=False, activation=layers.LeakyReLU(0.2),
                   use_bias=True, use_dropout=True, drop_value=0.3)
    x = conv_block(x, 32, kernel_size=(5, 5), strides=(2, 2), use_bn=False, activation=layers.LeakyReLU(0.2),
                   use_bias=True, use_dropout=True, drop_value=0.3)
    x = conv_block(x, 64, kernel_size=(5, 5), strides=(2, 2), use_bn=False, activation=layers.LeakyReLU(0.2),
                   use_bias=True, use_dropout=False, drop_value=0.3)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.2)(x)
    x = layers.Dense(1)(x)
    return keras.models.Model(img_input, x, name="discriminator")


def upsample_block(x, filters, activation, kernel_size=(3, 3), strides=(1, 1), up_size=(2, 2), padding="same",
                   use_bn=False, use_bias=True, use_dropout=False, drop_value=0.3):
    x = layers.UpSampling2D(up_size)(x)
    x = layers.Conv2D(filters, kernel_size, strides=strides, padding=padding, use_bias=use_bias)(x)
    if use_bn:
        x = layers.BatchNormalization()(x)
    if activation:
        x = activation(x)
    if use_dropout:
        x = layers.Dropout(drop_value)(x)
    return x


def get_generator_model():
    noise = layers.Input(shape=(NOISE_DIM,))
    x = layers.Dense(2 * 2 * 32, use_bias=False)(noise)
    x = layers.BatchNormalization()(x)
    x = layers.LeakyReLU(0.2)(x)
    x = layers.Reshape((2, 2, 32))(x)
    x = upsample_block(x, 16, layers.LeakyReLU(0.2), strides=(1, 1), use_bias=False, use_bn=True,
                       padding="same", use_dropout=False)
    x = upsample_block(x, 8, layers.LeakyReLU(0.2), strides=(1, 1), use_bias=False, use_bn=True,
                       padding="same", use_dropout=False)
    x = upsample_block(x, 1, layers.Activation("tanh"), strides=(1, 1), use_bias=False, use_bn=True)
    # 16x16 here (the example: 32x32), cropped to the images' 8x8 (28x28)
    x = layers.Cropping2D((4, 4))(x)
    return keras.models.Model(noise, x, name="generator")


class WGAN(keras.Model):
    def __init__(self, discriminator, generator, latent_dim, discriminator_extra_steps=3, gp_weight=10.0):
        super().__init__()
        self.discriminator = discriminator
        self.generator = generator
        self.latent_dim = latent_dim
        self.d_steps = discriminator_extra_steps
        self.gp_weight = gp_weight
        # the example draws with the unseeded tf.random.normal; a seed generator makes two runs match
        self.seed_generator = keras.random.SeedGenerator(1337)

    def compile(self, d_optimizer, g_optimizer, d_loss_fn, g_loss_fn):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        self.d_loss_fn = d_loss_fn
        self.g_loss_fn = g_loss_fn

    def gradient_penalty(self, batch_size, real_images, fake_images):
        """Calculates the gradient penalty on an interpolated image, added to the discriminator loss."""
        alpha = keras.random.normal([batch_size, 1, 1, 1], 0.0, 1.0, seed=self.seed_generator)
        diff = fake_images - real_images
        interpolated = real_images + alpha * diff
        with tf.GradientTape() as gp_tape:
            gp_tape.watch(interpolated)
            # 1. Get the discriminator output for this interpolated image.
            pred = self.discriminator(interpolated, training=True)
        # 2. Calculate the gradients w.r.t to this interpolated image.
        grads = gp_tape.gradient(pred, [interpolated])[0]
        # 3. Calculate the norm of the gradients.
        norm = tf.sqrt(tf.reduce_sum(tf.square(grads), axis=[1, 2, 3]))
        gp = tf.reduce_mean((norm - 1.0) ** 2)
        return gp

    def train_step(self, real_images):
        if isinstance(real_images, tuple):
            real_images = real_images[0]
        batch_size = tf.shape(real_images)[0]
        # Train the discriminator first, d_steps times per generator step.
        for i in range(self.d_steps):
            random_latent_vectors = keras.random.normal((batch_size, self.latent_dim), seed=self.seed_generator)
            with tf.GradientTape() as tape:
                fake_images = self.generator(random_latent_vectors, training=True)
                fake_logits = self.discriminator(fake_images, training=True)
                real_logits = self.discriminator(real_images, training=True)
                d_cost = self.d_loss_fn(real_img=real_logits, fake_img=fake_logits)
                gp = self.gradient_penalty(batch_size, real_images, fake_images)
                d_loss = d_cost + gp * self.gp_weight
            d_gradient = tape.gradient(d_loss, self.discriminator.trainable_variables)
            self.d_optimizer.apply_gradients(zip(d_gradient, self.discriminator.trainable_variables))
        # Train the generator
        random_latent_vectors = keras.random.normal((batch_size, self.latent_dim), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            generated_images = self.generator(random_latent_vectors, training=True)
            gen_img_logits = self.discriminator(generated_images, training=True)
            g_loss = self.g_loss_fn(gen_img_logits)
        gen_gradient = tape.gradient(g_loss, self.generator.trainable_variables)
        self.g_optimizer.apply_gradients(zip(gen_gradient, self.generator.trainable_variables))
        return {"d_loss": d_loss, "g_loss": g_loss}


def discriminator_loss(real_img, fake_img):
    real_loss = tf.reduce_mean(real_img)
    fake_loss = tf.reduce_mean(fake_img)
    return fake_loss - real_loss


def generator_loss(fake_img):
    return -tf.reduce_mean(fake_img)


def wgan_gp(seed=0):
    keras.utils.set_random_seed(seed)
    wgan = WGAN(discriminator=get_discriminator_model(), generator=get_generator_model(), latent_dim=NOISE_DIM,
                discriminator_extra_steps=3)
    wgan.compile(
        d_optimizer=keras.optimizers.Adam(learning_rate=0.0002, beta_1=0.5, beta_2=0.9),
        g_optimizer=keras.optimizers.Adam(learning_rate=0.0002, beta_1=0.5, beta_2=0.9),
        g_loss_fn=generator_loss,
        d_loss_fn=discriminator_loss,
    )
    return wgan


def gan_images(n=128, seed=0, size=None):
    """"Garments" in [-1, 1] (the example scales Fashion-MNIST so): a bright block of random size and
    brightness on a dark (-1) background, with a little noise."""
    size = size or GAN_IMAGE[0]
    rng = np.random.default_rng(seed)
    x = -np.ones((n, size, size, 1), "float32")
    for k in range(n):
        h, w = rng.integers(size // 3, size, 2)
        top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        x[k, top: top + h, left: left + w, 0] = rng.uniform(0.3, 1.0)
    return np.clip(x + 0.1 * rng.normal(size=x.shape), -1.0, 1.0).astype("float32")


# -- a deep ReLU MLP that one SGD(3.0) update blows up --------------------------------------------------

def deep_relu_mlp(seed=0, depth=6, units=32, lr=3.0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((8,))] + [layers.Dense(units, activation="relu") for _ in range(depth)] + [layers.Dense(1)],
        name="deep_mlp",
    )
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr), loss="mse")
    return model


def regression_data(n=64, seed=0, scale=100.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    y = (scale * np.tanh(x @ rng.normal(size=(8, 1)))).astype("float32")
    return x, y

"""The training state, the paper's update and the train and eval steps.

`train_step` and `eval_step` work on one device's towers; `map_train_step`
and `map_eval_step` map them over a `parallel.Layout` exactly as training
does: uint8 batches in, normalised on the device (alexnet/data/on_device.py).
The training loop (`train.py` at the repository root), the experiments and
the benchmarks all take their steps from here.
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from optax import contrib

from alexnet import evaluation
from alexnet import model as model_lib
from alexnet import parallel
from alexnet import schedule as schedule_lib
from alexnet.data import on_device

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """The whole training state, one host copy (tower leaves are [2, ...]).

  The data position and the dropout keys are functions of (seed, step), so
  `step` is all the checkpoint needs to resume them exactly.
  """

  step: int
  params: PyTree
  opt_state: optax.OptState
  plateau: contrib.ReduceLROnPlateauState


def create_model(config: ml_collections.ConfigDict, num_classes: int,
                 exchange: model_lib.Exchange | None = None
                 ) -> model_lib.AlexNet:
  """The net the config describes; `exchange` None keeps all towers local."""
  return model_lib.AlexNet(
      num_classes=num_classes, width=config.width, towers=config.towers,
      lrn_enabled=config.lrn.enabled, lrn_k=config.lrn.k,
      lrn_size=config.lrn.size, lrn_alpha=config.lrn.alpha,
      lrn_beta=config.lrn.beta,
      lrn_alpha_over_size=config.lrn.alpha_over_size,
      lrn_across_towers=config.lrn.across_towers, pool_size=config.pool_size,
      pool_stride=config.pool_stride, activation=config.activation,
      dropout_rate=config.dropout_rate, init_scheme=config.init_scheme,
      conv_impl=config.conv_impl, dtype=jnp.dtype(config.dtype),
      exchange=exchange)


def decay_mask(params: PyTree) -> PyTree:
  """True for kernels: weight decay skips biases, as cuda-convnet2/Caffe do."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: path[-1].key == 'kernel', params)


def make_optimizer(config: ml_collections.ConfigDict,
                   learning_rate: float | jax.Array
                   ) -> optax.GradientTransformation:
  """The paper's update (section 5), with the learning rate inside v.

  v <- momentum * v - weight_decay * lr * w - lr * grad;  w <- w + v.
  The chain holds no learning-rate state, so `learning_rate` can be a traced
  argument of the train step: a drop does not recompile.

  Fine-tuning (config.reinit with config.reinit_lr_multiplier m != 1):
  the re-initialised layers' step is scaled before the momentum, as Caffe's
  lr_mult does: v <- momentum * v - m * lr * (grad + weight_decay * w).

  Args:
    config: uses momentum and weight_decay; reinit and
      reinit_lr_multiplier where the config has them.
    learning_rate: the current learning rate.

  Returns:
    The optax transformation.
  """
  multiplier = config.get('reinit_lr_multiplier', 1.0)
  multiplied = ()
  if config.get('reinit') and multiplier != 1.0:
    multiplied = (optax.masked(optax.scale(multiplier),
                               functools.partial(layer_mask, config.reinit)),)
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(learning_rate),
      *multiplied,
      optax.trace(decay=config.momentum))


def layer_mask(layers: tuple[str, ...], params: PyTree) -> PyTree:
  """True for every leaf of the named top-level layers (e.g. 'fc8')."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: path[0].key in layers, params)


def initial_tree(config: ml_collections.ConfigDict,
                  model: model_lib.AlexNet) -> PyTree:
  """{'params', 'opt_state', 'plateau'} at step 0, as a jittable function."""
  images = jnp.zeros((1, config.image_size, config.image_size, 3))
  params = model.init(jax.random.key(config.seed), images,
                      train=False)['params']
  return {'params': params,
          'opt_state': make_optimizer(config, 0.0).init(params),
          'plateau': schedule_lib.make_plateau(config).init(None)}


def create_train_state(config: ml_collections.ConfigDict,
                       model: model_lib.AlexNet) -> TrainState:
  """Initial state on the host; the same for every device layout.

  Args:
    config: uses seed and image_size.
    model: a model with both towers local (the default exchange).

  Returns:
    The state at step 0.
  """
  tree = jax.jit(functools.partial(initial_tree, config, model))()
  return TrainState(step=0, **jax.device_get(tree))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(device_state: PyTree, batch: dict[str, jax.Array],
               learning_rate: jax.Array, step: jax.Array, *,
               model: model_lib.AlexNet, layout: parallel.Layout,
               config: ml_collections.ConfigDict
               ) -> tuple[PyTree, dict[str, jax.Array]]:
  """One SGD step on this device's towers.

  Args:
    device_state: {'params', 'opt_state'} of this device's towers.
    batch: this replica's {'image', 'label'}.
    learning_rate: the current learning rate.
    step: the global step; keys dropout together with the replica and tower.
    model: the net with the layout's exchange.
    layout: the device layout.
    config: the experiment config.

  Returns:
    The new device state and {'loss', 'accuracy'} averaged over replicas.
  """
  dropout_key = jax.random.fold_in(
      jax.random.fold_in(jax.random.key(config.seed), step),
      layout.replica_index())

  def loss_fn(params):
    logits = model.apply({'params': params}, batch['image'], train=True,
                         rngs={'dropout': dropout_key})
    return cross_entropy(logits, batch['label']).mean(), logits

  params, opt_state = device_state['params'], device_state['opt_state']
  loss, logits, grads = layout.grad(loss_fn)(params)
  updates, opt_state = make_optimizer(config, learning_rate).update(
      grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  metrics = layout.mean_over_replicas({'loss': loss, 'accuracy': accuracy})
  return {'params': params, 'opt_state': opt_state}, metrics


def eval_step(params: PyTree, batch: dict[str, jax.Array], *,
              model: model_lib.AlexNet, layout: parallel.Layout
              ) -> dict[str, jax.Array]:
  """Metric sums of one evaluation batch over all replicas."""
  images = batch['image']
  flat = images.reshape(-1, *images.shape[2:])
  logits = model.apply({'params': params}, flat, train=False)
  logits = logits.reshape(*images.shape[:2], -1)
  return layout.sum_over_replicas(
      evaluation.eval_metrics(logits, batch['label'], batch['mask']))


def shape_signature(config: ml_collections.ConfigDict,
                    num_classes: int) -> dict[str, Any]:
  """The settings that fix parameter shapes: a checkpoint must match them."""
  return {'num_classes': num_classes, 'width': config.width,
          'image_size': config.image_size, 'towers': config.towers,
          'pool_size': config.pool_size, 'pool_stride': config.pool_stride}


def map_train_step(model: model_lib.AlexNet, layout: parallel.Layout,
                   config: ml_collections.ConfigDict) -> Any:
  """`train_step` mapped over the layout, fed uint8 batches.

  Args:
    model: the net with the layout's exchange.
    layout: the device layout.
    config: the experiment config.

  Returns:
    (device_state, batch, mean_image, learning_rate, step) ->
    (device_state, metrics): batch holds this process's replicas' uint8
    crops with their offsets, flips and lighting shifts (leading axis R),
    mean_image is `layout.replicate`d; device_state is donated.
  """
  def normalised_step(device_state, batch, mean_image, learning_rate, step):
    inputs = {'image': on_device.train_images(batch, mean_image,
                                              config.channel_order),
              'label': batch['label']}
    return train_step(device_state, inputs, learning_rate, step,
                      model=model, layout=layout, config=config)
  return layout.pmap(normalised_step, in_axes=(0, 0, 0, None, None),
                     out_axes=(0, None), donate_argnums=(0,))


def map_eval_step(model: model_lib.AlexNet, layout: parallel.Layout,
                  config: ml_collections.ConfigDict) -> Any:
  """`eval_step` mapped over the layout, fed uint8 squares.

  Returns:
    (params, batch, mean_image) -> metric sums over all replicas: the
    centre view, and the 10 views when config.ten_crop.
  """
  def normalised_step(params, batch, mean_image):
    views = on_device.eval_images(batch, mean_image, config.image_size,
                                  config.ten_crop, config.channel_order)
    return eval_step(params, {**batch, 'image': views}, model=model,
                     layout=layout)
  return layout.pmap(normalised_step, out_axes=None)

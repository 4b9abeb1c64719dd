"""Tests for nfnet_jax.losses against NumPy references."""

from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnet_jax import losses

FAST = settings(max_examples=20, deadline=None)

# A few fixed shapes keep jit recompilation (and the test time) low.
shapes = st.sampled_from([(1, 2), (4, 10), (8, 1000)])
seeds = st.integers(0, 2**31 - 1)
smoothing = st.sampled_from([0.0, 0.1, 0.3])

_xent = jax.jit(losses.softmax_cross_entropy, static_argnums=(2,))


def np_xent(logits, target_dist):
  """-sum(t * log_softmax(logits)) in float64, via a stable log-sum-exp."""
  x = np.asarray(logits, np.float64)
  m = x.max(-1, keepdims=True)
  log_probs = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
  return -(np.asarray(target_dist, np.float64) * log_probs).sum(-1)


def _logits(rng, shape, scale=3.0):
  return (rng.standard_normal(shape) * scale).astype(np.float32)


@FAST
@given(shape=shapes, seed=seeds, ls=smoothing)
def test_int_labels_equal_one_hot(shape, seed, ls):
  rng = np.random.default_rng(seed)
  b, c = shape
  logits = _logits(rng, shape)
  labels = rng.integers(0, c, size=(b,)).astype(np.int32)
  one_hot = np.eye(c, dtype=np.float32)[labels]
  a = _xent(logits, labels, c, ls)
  h = _xent(logits, one_hot, c, ls)
  assert a.shape == (b,) and a.dtype == jnp.float32
  np.testing.assert_allclose(a, h, rtol=1e-6, atol=1e-6)


@FAST
@given(shape=shapes, seed=seeds, ls=smoothing)
def test_label_smoothing_matches_numpy(shape, seed, ls):
  rng = np.random.default_rng(seed)
  b, c = shape
  logits = _logits(rng, shape)
  labels = rng.integers(0, c, size=(b,))
  target = np.full((b, c), ls / c)
  target[np.arange(b), labels] += 1.0 - ls
  got = _xent(logits, labels.astype(np.int32), c, ls)
  np.testing.assert_allclose(got, np_xent(logits, target), rtol=1e-5, atol=1e-5)


@FAST
@given(shape=shapes, seed=seeds, ls=smoothing)
def test_soft_labels_match_numpy(shape, seed, ls):
  rng = np.random.default_rng(seed)
  b, c = shape
  logits = _logits(rng, shape)
  # MixUp/CutMix-like targets: a convex mix of two one-hots.
  lam = rng.uniform(size=(b, 1))
  y1 = np.eye(c)[rng.integers(0, c, size=b)]
  y2 = np.eye(c)[rng.integers(0, c, size=b)]
  soft = lam * y1 + (1 - lam) * y2
  got = _xent(logits, soft.astype(np.float32), c, ls)
  np.testing.assert_allclose(got, np_xent(logits, soft * (1 - ls) + ls / c), rtol=1e-5, atol=1e-5)


def test_bf16_logits_give_float32_loss():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(_logits(rng, (16, 1000), scale=10.0), jnp.bfloat16)
  labels = jnp.asarray(rng.integers(0, 1000, size=16), jnp.int32)
  loss = losses.softmax_cross_entropy(logits, labels, 1000, 0.1)
  assert loss.dtype == jnp.float32
  # Computed in float32 from the (exact) bf16 values, not in bf16.
  target = np.full((16, 1000), 0.1 / 1000)
  target[np.arange(16), np.asarray(labels)] += 0.9
  ref = np_xent(np.asarray(logits.astype(jnp.float32)), target)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  # A bf16 softmax would be off by far more than this.
  bf16_loss = -jnp.sum(jnp.asarray(target, jnp.bfloat16) * jax.nn.log_softmax(logits), -1)
  assert np.max(np.abs(np.float64(bf16_loss) - ref)) > 1e-3


def test_loss_gradient_is_softmax_minus_target():
  rng = np.random.default_rng(1)
  logits = _logits(rng, (4, 5))
  labels = np.array([0, 3, 4, 1], np.int32)
  grad = jax.grad(lambda x: losses.softmax_cross_entropy(x, labels, 5, 0.1).sum())(logits)
  p = np.exp(np.float64(logits))
  p /= p.sum(-1, keepdims=True)
  target = np.full((4, 5), 0.1 / 5)
  target[np.arange(4), labels] += 0.9
  np.testing.assert_allclose(grad, p - target, rtol=1e-5, atol=1e-6)


def test_bad_shapes_raise():
  logits = jnp.zeros((2, 5))
  with pytest.raises(ValueError):
    losses.softmax_cross_entropy(logits, jnp.array([0, 1]), 4)
  with pytest.raises(ValueError):
    losses.softmax_cross_entropy(logits, jnp.zeros((2, 4)), 5)
  with pytest.raises(ValueError):
    losses.softmax_cross_entropy(logits, jnp.array([0.0, 1.0]), 5)


def np_topk(logits, labels, k):
  order = np.argsort(-np.asarray(logits, np.float64), axis=-1, kind='stable')
  return np.array([lab in row[:k] for row, lab in zip(order, labels)], np.float32)


@FAST
@given(shape=st.sampled_from([(4, 10), (16, 100)]), seed=seeds, k=st.sampled_from([1, 5]))
def test_topk_correct_matches_numpy(shape, seed, k):
  rng = np.random.default_rng(seed)
  b, c = shape
  # A permutation per row: distinct logits, no ties.
  logits = np.stack([rng.permutation(c) for _ in range(b)]).astype(np.float32)
  labels = rng.integers(0, c, size=b).astype(np.int32)
  got = losses.topk_correct(logits, labels, k)
  assert got.dtype == jnp.float32 and got.shape == (b,)
  np.testing.assert_array_equal(got, np_topk(logits, labels, k))
  # Soft labels are reduced to their argmax.
  soft = 0.3 / c + 0.7 * np.eye(c, dtype=np.float32)[labels]
  np.testing.assert_array_equal(losses.topk_correct(logits, soft, k), got)


def test_topk_correct_small_cases():
  logits = jnp.array([[0.1, 0.5, 0.2, 0.9], [3.0, 1.0, 2.0, 0.0]], jnp.bfloat16)
  labels = jnp.array([1, 1])
  np.testing.assert_array_equal(losses.topk_correct(logits, labels, 1), [0, 0])
  np.testing.assert_array_equal(losses.topk_correct(logits, labels, 2), [1, 0])
  np.testing.assert_array_equal(losses.topk_correct(logits, labels, 3), [1, 1])
  # k above the number of classes: everything is correct.
  np.testing.assert_array_equal(losses.topk_correct(logits, labels, 10), [1, 1])
  top1 = jax.jit(losses.topk_correct, static_argnums=2)(logits, labels, 1)
  np.testing.assert_array_equal(top1, np.argmax(np.float32(logits), -1) == np.asarray(labels))

"""Bits per dimension from a model's log-density on the logits and the dataset's log-dets.

For logits y of a D-value image, log p(y) + logdet is the log-density of the
point z = x~ / (L-1+c) in [0,1)^D; dividing by the cube's side in pixel units
and multiplying by the volume c^D of one level's cell gives (a lower bound
on) the log-probability of the discrete image, hence

    bits/dim = -(log p(y) + logdet - bpd_offset_nats) / (D ln 2),
    bpd_offset_nats = D log((L-1+c)/c).

With K noise draws per image the importance-weighted bound (Flow++'s
run_iw_eval) replaces log p(y) + logdet by logsumexp_k(log p(y_k) + logdet_k) - log K.
Both helpers take TensorFlow tensors (and stay differentiable) or NumPy arrays.
"""
from __future__ import annotations

import math

import numpy as np


def _dims_offset(manifest):
    """(D, bpd_offset_nats) from a dataset path, Manifest or LogitDataset."""
    if isinstance(manifest, (str, bytes)) or hasattr(manifest, "__fspath__"):
        from .dataset import read_manifest

        manifest = read_manifest(str(manifest))  # the offset is the same for every split
    m = getattr(manifest, "manifest", manifest)  # a LogitDataset holds its Manifest
    dims = int(m.dims)
    return dims, float(m.params.bpd_offset_nats(dims))


def _is_tf(*xs):
    return any(type(x).__module__.startswith("tensorflow") for x in xs)


def bits_per_dim(log_prob, logdet, manifest):
    """-(log p(y) + logdet - bpd_offset_nats) / (D ln 2), per image."""
    dims, offset = _dims_offset(manifest)
    if _is_tf(log_prob, logdet):
        from ._tf import tf as _tf

        tf = _tf()
        # Python floats become float32 tensors unless told: constants take log_prob's dtype.
        log_prob = tf.convert_to_tensor(log_prob)
        total = log_prob + tf.cast(logdet, log_prob.dtype)
        return -(total - tf.constant(offset, log_prob.dtype)) / tf.constant(dims * math.log(2.0), log_prob.dtype)
    total = np.asarray(log_prob, np.float64) + np.asarray(logdet, np.float64)
    return -(total - offset) / (dims * math.log(2.0))


def iw_bits_per_dim(log_probs, logdets, manifest):
    """Importance-weighted bits/dim from K draws per image: log-probs and log-dets [..., K]."""
    dims, offset = _dims_offset(manifest)
    if _is_tf(log_probs, logdets):
        from ._tf import tf as _tf

        tf = _tf()
        log_probs = tf.convert_to_tensor(log_probs)
        total = log_probs + tf.cast(logdets, log_probs.dtype)
        k = tf.cast(tf.shape(total)[-1], log_probs.dtype)
        bound = tf.reduce_logsumexp(total, axis=-1) - tf.math.log(k)
        return -(bound - tf.constant(offset, log_probs.dtype)) / tf.constant(dims * math.log(2.0), log_probs.dtype)
    total = np.asarray(log_probs, np.float64) + np.asarray(logdets, np.float64)
    top = np.max(total, axis=-1, keepdims=True)
    bound = np.squeeze(top, -1) + np.log(np.sum(np.exp(total - top), axis=-1)) - math.log(total.shape[-1])
    return -(bound - offset) / (dims * math.log(2.0))

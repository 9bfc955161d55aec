"""The numpy classifier-head forward used for sensitivity trials matches OpenCV."""
import cv2
import numpy as np

from caffe_compress import io, tail
from test_tradeoff import small_model


def test_tail_matches_opencv(tmp_path):
    deploy, model = small_model(tmp_path)
    net = io.load(deploy, model)
    chain = tail.tail_chain(net, "fc1", "prob")
    assert [l.name for l in chain] == ["fc1", "relu3", "fc2", "prob"]
    assert tail.tail_chain(net, "conv2", "prob") is None  # convolutions are not a plain head
    cv = cv2.dnn.readNetFromCaffe(str(deploy), str(model))
    x = np.random.default_rng(0).standard_normal((3, 3, 24, 24)).astype(np.float32)
    cv.setInput(x)
    pool, prob = cv.forward(["pool", "prob"])
    assert np.allclose(tail.run_tail(chain, pool), prob, rtol=1e-4, atol=1e-6)
    w = np.zeros_like(net.layer("fc2").blobs[0])
    uniform = tail.run_tail(chain, pool, {"fc2": w})
    assert np.allclose(uniform, 1.0 / 10)  # zero weights, zero bias: a flat softmax

"""Build the example model bundled with accelkit (accelkit/examples/digits_cnn.onnx).

A small CNN trained on scikit-learn's handwritten digits (8x8 grey images, shipped inside
scikit-learn, no download), exported by torch.onnx.export (opset 17) with a symbolic batch
dimension; the held-out images go to digits_test.npz. Needs torch and scikit-learn:
    pip install torch==2.13.0 scikit-learn && python examples/make_digits_model.py
"""
import os

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

OUT = os.path.join(os.path.dirname(__file__), "..", "accelkit", "examples")


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU(),
                                        nn.Linear(128, 10))

    def forward(self, pixels):
        return self.classifier(self.features(pixels))


def main():
    torch.manual_seed(0)
    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[:, None]  # N x 1 x 8 x 8 in [0, 1]
    labels = digits.target.astype("int64")
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:1400], order[1400:]
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = torch.from_numpy(images[train]), torch.from_numpy(labels[train])
    for epoch in range(30):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(torch.from_numpy(images[test])).argmax(1).numpy() == labels[test]).mean()
    print(f"held-out accuracy: {acc:.4f} on {len(test)} images")
    os.makedirs(OUT, exist_ok=True)
    torch.onnx.export(model, (x[:1],), os.path.join(OUT, "digits_cnn.onnx"), opset_version=17,
                      input_names=["pixels"], output_names=["logits"],
                      dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    np.savez_compressed(os.path.join(OUT, "digits_test.npz"), pixels=images[test], labels=labels[test])


if __name__ == "__main__":
    main()

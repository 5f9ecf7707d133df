"""Explain a randomly initialized ResNet-50 on random images, offline, and print what came out."""

import time

import torch
import torchvision

import caffast

torch.manual_seed(0)
model = torchvision.models.resnet50().eval()
images = torch.randn(2, 3, 224, 224)

start = time.perf_counter()
exp = caffast.explain(model, images, "layer4", mode="specific", targets=[1, 2], max_iter=100)
seconds = time.perf_counter() - start

print(f"tail: {exp.tail}, backend: {exp.backend}, {seconds:.2f} s")
print(f"maps {tuple(exp.maps.shape)}, iterations {exp.iterations.tolist()}")
print("map of image 0, class 1:")
print(exp.maps[0, 0].numpy().round(3))

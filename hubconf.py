"""torch.hub entry points: ``torch.hub.load(repo_dir, "resnet50", checkpoint=..., source="local")``."""

dependencies = ["torch", "torchvision"]

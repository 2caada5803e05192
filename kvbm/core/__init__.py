"""The core seams: typed transfer plans (control -> data plane) and the compact index."""

"""Transfer plans and (later) the compact index: the core seams between control and data planes."""

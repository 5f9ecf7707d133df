"""The method: explain, breakpoints and tails, fused heads, constraints, losses, the loop and the solvers."""

"""Training: the loop, its optimizer and schedule, distributed data parallel, branching experts
from a seed, and launching expert jobs on clusters."""

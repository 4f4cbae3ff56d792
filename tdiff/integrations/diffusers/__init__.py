"""tdiff inside diffusers (the only package that imports diffusers; nothing here is imported by `import tdiff`).

- scheduler.py: `TdiffScheduler`, tdiff's solvers and time steps as a diffusers scheduler;
- pipelines.py: a pipeline's network, schedule and conditioning as a tdiff Denoiser, and the one-call helpers
  (`tdiff.ld3_learn(pipe, ...)`, `tdiff.timesteps.dm_nonuniform(pipe, ...)`) that return a TdiffScheduler.
Public names are re-exported by `tdiff.schedulers`.
"""

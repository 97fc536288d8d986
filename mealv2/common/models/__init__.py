"""Models: checkpoint I/O, teachers and the ensemble, the teacher check, the runtime (device,
precision, memory format) and distributed setup."""

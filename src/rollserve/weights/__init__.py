"""Everything about weights crossing processes: tensor specs and their checks (specs), tensors
in shared memory (ipc), the trainer-engine broadcast group (group), and applying an update to
a running model (updater). The server's weight routes and the trainer's WeightSync call in."""

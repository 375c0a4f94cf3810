"""The run engine: plan, units of work, the shard writer, assembly, the folder lock, build options and recipes."""

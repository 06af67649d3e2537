"""--dry-run, the same in each script: the parameters counted on the meta device, the memory plan of a training
run, the results record where --output asks, then the pre-flight's findings and exit status. No weights or data
are loaded."""

from lvf import models, plan, precision, preflight, results


def dry_run(settings, runtime, method, model, resolve_runtime=None, model_name=None, **recorded):
    """model: on the meta device, as the run builds it (LoRA's with its adapters: counted unquantised, since 4-bit
    storage does not change the counts). resolve_runtime: the training method's (lvf.lora's or lvf.full's), which
    also gives the plan on one 80 GB GPU where this machine has none; None for an evaluation, which trains nothing
    and plans no memory. model_name: the weights the pre-flight checks, when not --model's; recorded: more result
    fields. Returns the exit status."""
    trainable, total = models.count_parameters(model)
    if resolve_runtime is None:
        precision.announce_gpu_scoring(settings, runtime)  # the training scripts' 80 GB plan line says it too
        record = results.build_results(settings, runtime, method, **recorded, total_params=total, base_params=total)
        results.finish(record, runtime.output)
        return preflight.report_and_exit_code(settings, runtime, method, params=total, trainable=0, model=model_name)
    base_params = total - trainable if trainable < total else total  # LoRA: all but the adapters; full: all
    planned = plan.announce_plan(settings, runtime, method, model)
    plan.announce_gpu_plan(settings, runtime, method, model, resolve_runtime)
    record = results.build_results(settings, runtime, method, trainable_params=trainable, total_params=total,
                                   base_params=base_params, planned_memory=planned)
    results.finish(record, runtime.output)
    return preflight.report_and_exit_code(settings, runtime, method, params=base_params, trainable=trainable,
                                          planned_memory=planned)

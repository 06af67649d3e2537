"""How every script scores a model: held-out perplexity with its interval and the weights' precision
(common.evaluate_perplexity), the general text's (forgetting) when given, and the write-up's metric when
--seed-style-metric asks (lvf.writeup)."""

import common
from lvf import writeup


def evaluate_model(model, tokenizer, eval_examples, eval_records, settings, device, desc, general_examples=None):
    """Held-out perplexity with its interval; the general text's (forgetting) when given, in general_*
    fields; and the write-up's metric when --seed-style-metric asks."""
    evaluation = common.evaluate_perplexity(model, eval_examples, tokenizer.pad_token_id, settings.eval_batch_size,
                                            device, settings.seed, settings.bootstrap_resamples, desc=desc)
    evaluation["eval_precision"] = common.eval_precision(model)
    if general_examples:
        general = common.evaluate_perplexity(model, general_examples, tokenizer.pad_token_id,
                                             settings.eval_batch_size, device, settings.seed,
                                             settings.bootstrap_resamples, desc=f"{desc} (general)")
        evaluation.update({f"general_{key}": general[key] for key in common.GENERAL_FIELDS})
        evaluation["general_file"] = settings.general_file
    if settings.seed_style_metric:
        evaluation["seed_style_perplexity"] = writeup.seed_style_perplexity(model, tokenizer, eval_records,
                                                                            settings.eval_batch_size, device)
    return evaluation

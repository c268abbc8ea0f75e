"""Plant one bug at a time in a copy of the code and check that the tests meant to see it fail.

    python tests/mutants.py                 # every mutant (~14 min on 2 cores)
    python tests/mutants.py context nan     # the mutants whose names contain these words

A mutant is (name, file, old text, new text, tests to run); `old` must occur in the file (a mutant that no longer
applies is reported as STALE, so the list follows the code). Not a test itself: pytest does not collect it.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MUTANTS = [
    # data: pairing, epochs, ranks, context
    ("masks paired with other slices", "feed.py", "self.slices.masks[idx]) for idx", "self.slices.masks[idx.flip(0)]) for idx",
     "tests/test_batches.py"),
    ("an epoch repeats its first batch", "feed.py", "for idx in order.split(self.batch_size))",
     "for idx in [order[:self.batch_size]] * (len(order) // self.batch_size))", "tests/test_batches.py"),
    ("never shuffles", "feed.py", "torch.randperm(n, generator=generator)[rank::world]", "torch.arange(n)[rank::world]",
     "tests/test_batches.py"),
    ("every rank draws the same slices", "feed.py", "torch.randperm(n, generator=generator)[rank::world]",
     "torch.randperm(n, generator=generator)[::world]", "tests/test_batches.py"),
    ("context neighbours in reverse", "feed.py", "offsets = torch.arange(-context, context + 1)",
     "offsets = torch.arange(context, -context - 1, -1)", "tests/test_batches.py"),
    ("modality dropout drawn per channel, not per modality", "feed.py", "k = modalities or c", "k = c",
     "tests/test_batches.py"),
    # modality dropout
    ("modality dropout spares the fraction it should hit", "feed.py", "generator) < modality_dropout",
     "generator) >= modality_dropout", "tests/test_batches.py -k modality"),
    ("modality dropout blanks the wrong context copies", "feed.py", "keep.repeat(1, c // k)",
     "keep.repeat_interleave(c // k, 1)", "tests/test_batches.py -k modality"),
    ("--modality-dropout not passed to the batches", "train.py", "\n        modality_dropout=cfg.modality_dropout)", ")",
     "tests/test_train.py -k augmentation"),
    # bench/contrast.py
    ("contrast counts the ties as below", "bench/contrast.py", "(in_brain < medians)", "(in_brain <= medians)",
     "tests/test_contrast.py"),
    ("contrast ranks the label's mean", "bench/contrast.py", "np.median(normalised[inside], axis=0)", "np.mean(normalised[inside], axis=0)",
     "tests/test_contrast.py"),
    ("--train-seed ignored", "train.py", "return cfg.seed if cfg.train_seed is None else cfg.train_seed",
     "return cfg.seed", "tests/test_train.py -k train_seed"),
    ("--train-seed reshuffles the split", "train.py", "split_volumes(cache.volume_ids, cfg.seed,",
     "split_volumes(cache.volume_ids, training_seed(cfg),", "tests/test_train.py -k train_seed"),
    ("--train-seed leaves the initial weights to --seed", "train.py", "torch.manual_seed(training_seed(cfg) + rank)",
     "torch.manual_seed(cfg.seed + rank)", "tests/test_train.py -k train_seed"),
    ("DataLoader path serves the next slice's mask", "feed.py", "torch.from_numpy(np.array(masks[k]))",
     "torch.from_numpy(np.array(masks[min(k + 1, len(masks) - 1)]))", "tests/test_batches.py"),
    ("DataLoader path raises", "feed.py", "        return iter(self.order)", "        raise RuntimeError('planted')",
     "tests/test_batches.py tests/test_train.py"),
    ("augmentation moves image and mask apart", "feed.py",
     "x, y = torch.where(t, x.transpose(-1, -2), x), torch.where(t, y.transpose(-1, -2), y)",
     "x, y = torch.where(t, x.transpose(-1, -2), x), y", "tests/test_batches.py tests/test_data.py"),
    # data: readers and preprocessing
    ("NIfTI reader swaps x and y (image and label)", "data.py",
     [("image[..., c] = data.transpose(2, 0, 1)", "image[..., c] = data.transpose(2, 1, 0)"),
      ("label = data.astype(np.uint8).transpose(2, 0, 1)", "label = data.astype(np.uint8).transpose(2, 1, 0)")], None,
     "tests/test_anatomy.py"),
    ("NIfTI modalities stacked in another order", "data.py", "for c, m in enumerate(CHANNELS):\n        data, aff, sp",
     "for c, m in enumerate(reversed(CHANNELS)):\n        data, aff, sp", "tests/test_anatomy.py"),
    ("images transposed in preprocessing, masks not", "data.py", "images.transpose(0, 3, 1, 2)",
     "images.transpose(0, 3, 2, 1)", "tests/test_anatomy.py"),
    ("masks resized by averaging", "data.py", "interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA",
     "interp = cv2.INTER_AREA", "tests/test_anatomy.py"),
    ("crop box pasted back with x and y swapped", "data.py", "out[:, x0:x0 + side, y0:y0 + side] = values",
     "out[:, y0:y0 + side, x0:x0 + side] = values", "tests/test_anatomy.py tests/test_predict.py"),
    ("cache not rebuilt when a source file changes", "data.py",
     'h.update(f"{resolved}|{st.st_size}|{st.st_mtime_ns}\\n".encode())', 'h.update(f"{resolved}\\n".encode())',
     "tests/test_data.py"),
    # training
    ("optimiser never steps", "train.py", "        scaler.step(optimizer)\n", "", "tests/test_train.py"),
    ("training always stops after epoch 1", "train.py", "while progress.epoch <= progress.epochs and",
     "while progress.epoch <= 1 and", "tests/test_train.py"),
    ("--time-budget runs every --epochs", "train.py", "while progress.epoch <= progress.epochs and",
     "while progress.epoch <= cfg.epochs and", "tests/test_train.py -k budget"),
    ("--time-budget keeps the schedule of --epochs", "train.py", "    schedule.total_steps = epochs * steps_per_epoch\n",
     "", "tests/test_train.py -k budget"),
    ("--time-budget forgets the time already spent", "train.py", "1 + int((budget_s - elapsed_s) // epoch_s)",
     "1 + int(budget_s // epoch_s)", "tests/test_train.py -k budget"),
    ("training on the test patients", "train.py", "trained_on = split[\"train\"] + (",
     "trained_on = split[\"train\"] + split[\"test\"] + (", "tests/test_train.py"),
    ("--train-on train+val leaves the validation patients out", "train.py",
     "(split[\"val\"] if cfg.train_on == \"train+val\" else [])", "[]", "tests/test_train.py"),
    ("--train-patients draws the same patients whatever the training seed", "train.py",
     "np.random.default_rng(training_seed(cfg)).permutation", "np.random.default_rng(0).permutation",
     "tests/test_train.py -k train_patients"),
    ("--train-patients is ignored", "train.py", "        trained_on = sorted(trained_on[i] for i in drawn)\n", "",
     "tests/test_train.py -k train_patients"),
    ("cv.py chooses a fold's post-processing on its own test patients too", "bench/cv.py",
     "rule([k for k in probs if k.split(\"/\", 1)[1] not in test_ids])", "rule(list(probs))", "tests/test_cv.py"),
    ("a fixed --postprocess is ignored", "train.py", "post, val_best = inference.parse_postprocess(cfg.postprocess), None",
     "post, val_best = None, None", "tests/test_train.py"),
    ("validation Dice pooled over volumes", "train.py",
     "\"val_dice\": metrics.nanmean(metrics.dice_from_counts(*per_volume).tolist())",
     "\"val_dice\": metrics.dice_from_counts(*[c.sum() for c in per_volume]).item()", "tests/test_evaluation.py"),
    ("--amp auto picks bf16 on any CPU", "inference.py", 'amp = "bf16" if native else "off"', 'amp = "bf16"',
     "tests/test_train.py -k native_bf16"),
    ("--channels-last auto on with bf16 on a CPU", "inference.py", 'channels_last = "on" if device.type == "cuda" else "off"',
     'channels_last = "on" if device.type == "cuda" or dtype == torch.bfloat16 else "off"',
     "tests/test_train.py -k native_bf16"),
    # evaluation
    ("post-processing search picks the worst", "inference.py", "if score > best[2] + 1e-9:",
     "if best[2] < 0 or score < best[2] - 1e-9:", "tests/test_evaluation.py"),
    ("largest-3D rule keeps the smallest component", "metrics.py", "return labels == sizes.argmax()",
     "return labels == sizes[1:].argmin() + 1", "tests/test_evaluation.py"),
    ("6- instead of 26-connectivity", "metrics.py", "structure=np.ones((3, 3, 3), bool)", "structure=None",
     "tests/test_evaluation.py"),
    ("4- instead of 8-connectivity in 2D", "metrics.py",
     "cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)",
     "cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=4)", "tests/test_evaluation.py"),
    ("volume Dice replaced by mean slice Dice", "inference.py", "\"dice\": metrics.dice_score(pred[None], truth[None]).item(),",
     "\"dice\": metrics.nanmean(dice.tolist()),", "tests/test_evaluation.py"),
    ("false-positive slices never counted", "inference.py", "fp += metrics.false_positive_slices(pred, truth)", "fp += 0",
     "tests/test_evaluation.py"),
    ("per-label share counted over the whole label, not the prediction", "metrics.py",
     "found = np.bincount(label[pred].ravel()", "found = np.bincount(label.ravel()",
     "tests/test_metrics.py -k recall"),
    ("per-label share of the wrong label", "predict.py", "for k, (r, n) in metrics.recall_per_label(pred, label).items()]",
     "for k, (r, n) in zip(metrics.BRATS_LABELS, reversed(metrics.recall_per_label(pred, label).values()))]",
     "tests/test_predict.py -k oracle"),
    # loss (the Triton kernels, in the interpreter)
    ("kernel backward drops the smooth term", "fused_dice.py", "(2.0 * s_py + smooth) / (den * den)",
     "(2.0 * s_py) / (den * den)", "tests/test_fused_dice.py"),
    ("kernel forward counts the padding lanes in sum p", "fused_dice.py", "acc_p += tl.where(mask, p, 0.0)", "acc_p += p",
     "tests/test_fused_dice.py"),
    ("kernel reduce swaps sum p*y and sum p", "fused_dice.py",
     [("tl.store(stats_ptr + 1, tot_py)", "tl.store(stats_ptr + 1, tot_p)"),
      ("tl.store(stats_ptr + 2, tot_p)", "tl.store(stats_ptr + 2, tot_py)")], None, "tests/test_fused_dice.py"),
    # predict
    ("predict ignores the checkpoint's threshold", "inference.py",
     "threshold=float(np.median([c[\"threshold\"] for c in ckpts])),", "threshold=0.5,", "tests/test_predict.py"),
    ("predict ignores the checkpoint's minimum component", "inference.py",
     "min_component=int(np.median([c[\"min_component\"] for c in ckpts])),", "min_component=0,", "tests/test_predict.py"),
    ("predict ignores the checkpoint's largest-3D rule", "inference.py",
     "largest_3d=2 * sum(bool(c[\"largest_3d\"]) for c in ckpts) > len(ckpts))", "largest_3d=False)",
     "tests/test_predict.py"),
    ("predict reverses the channels", "inference.py", "images[:, self.channels]", "images[:, self.channels[::-1]]",
     "tests/test_predict.py"),
    ("predict drops the sigmoid", "inference.py",
     "p = torch.sigmoid(data.uncrop(", "p = (data.uncrop(", "tests/test_predict.py"),
    ("the average counts its first prediction twice", "inference.py", "(p, 1) if total is None", "(p, 2) if total is None",
     "tests/test_predict.py::test_flips_and_models_average_against_a_float64_reference"),
    ("test-time flips not undone", "inference.py", "logits.flip(dims) if dims else logits", "logits",
     "tests/test_predict.py::test_flips_and_models_average_against_a_float64_reference"),
    ("test-time flips undone on the wrong axis", "inference.py", "logits.flip(dims) if dims else logits",
     "logits.flip([-1 - (-d % 2) for d in dims]) if dims else logits",
     "tests/test_predict.py::test_flips_and_models_average_against_a_float64_reference"),
    # figures
    ("overlays without colours", "figures.py",
     "rgb[mask] = (1 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * np.array(colour)", "pass", "tests/test_figures.py"),
    ("montages without outlines", "figures.py", "        ax.plot(pts[:, 0], pts[:, 1], color=colour, linewidth=0.9)",
     "        pass", "tests/test_figures.py"),
    # resume
    ("resume forgets the optimiser state", "train.py", "    optimizer.load_state_dict(state[\"optimizer\"])\n", "",
     "tests/test_resume.py"),
    ("SIGINT saves one batch too few", "train.py", "progress.batch, progress.totals, progress.seconds = b + 1,",
     "progress.batch, progress.totals, progress.seconds = b,", "tests/test_resume.py"),
    ("a non-finite loss goes unnoticed", "train.py", "if 0 <= first_bad < math.inf:", "if False:", "tests/test_resume.py"),
    # oracles and invariants (issue "Tests that catch bugs nobody has named yet")
    ("HD95 in one direction only", "metrics.py",
     "return float(max(np.percentile(dist_to_target[sp], 95), np.percentile(dist_to_pred[st], 95)))",
     "return float(np.percentile(dist_to_target[sp], 95))", "tests/test_metrics.py"),
    ("HD95 of an empty prediction ignores the spacing", "metrics.py",
     "sum((n * s) ** 2 for n, s in zip(pred.shape, spacing))", "sum(n ** 2 for n in pred.shape)",
     "tests/test_metrics.py"),
    ("evaluate passes the spacing in (x, y, z) order", "inference.py", "spacing=(z_mm, x_mm, y_mm)",
     "spacing=(x_mm, y_mm, z_mm)", "tests/test_evaluation.py"),
    ("the cosine decays to 0, not to its 1% floor", "train.py", "return 0.01 + 0.99 * 0.5 * (1 + math.cos(",
     "return 0.5 * (1 + math.cos(", "tests/test_train.py -k closed_form"),
    ("the schedule never advances", "train.py", "        scheduler.step()\n        return loss, logits",
     "        return loss, logits", "tests/test_train.py -k closed_form"),
    ("--bce-weight and --dice-weight swapped in the step", "train.py",
     "loss = dice_bce_loss(logits, y, bce_weight=cfg.bce_weight, dice_weight=cfg.dice_weight,",
     "loss = dice_bce_loss(logits, y, bce_weight=cfg.dice_weight, dice_weight=cfg.bce_weight,",
     "tests/test_train.py -k closed_form"),
    ("the torch backend ignores smooth", "fused_dice.py",
     "dice = (2.0 * (p * y).sum() + smooth) / (p.sum() + y.sum() + smooth)",
     "dice = (2.0 * (p * y).sum() + 1.0) / (p.sum() + y.sum() + 1.0)", "tests/test_fused_dice.py -k every_argument"),
    ("prediction with the model left in training mode", "inference.py", "    model.eval()\n", "",
     "tests/test_predict.py -k eval_mode"),
    ("an ensemble takes its first member's threshold", "inference.py",
     'threshold=float(np.median([c["threshold"] for c in ckpts]))', 'threshold=float(ckpts[0]["threshold"])',
     "tests/test_predict.py -k median"),
    ("the non-finite loss check catches NaN only", "train.py", "~torch.isfinite(loss.detach())",
     "torch.isnan(loss.detach())", "tests/test_resume.py -k non_finite"),
    ("--augment off still augments", "feed.py", "            if self.augment:\n", "            if True:\n",
     "tests/test_batches.py -k cached_slices"),
    ("--folds K trains on the validation fold too", "data.py", 'sorted(set(ids) - set(test) - set(val))',
     'sorted(set(ids) - set(test))', "tests/test_data.py -k k_folds"),
    ("validation Dice thresholds the logits at 0.5", "train.py", "per_slice = metrics.counts(logits > 0, masks)",
     "per_slice = metrics.counts(logits > 0.5, masks)", "tests/test_evaluation.py"),
    # every flag's effect (tests/test_flags.py)
    ("--weight-decay never reaches AdamW", "train.py", "lr=cfg.lr, weight_decay=cfg.weight_decay,", "lr=cfg.lr,",
     "tests/test_flags.py -k weight"),
    ("--warmup ignored: one step of warm-up", "train.py", "max(1, int(cfg.warmup * len(batches)))", "1",
     "tests/test_flags.py -k warmup"),
    ("--cache-dir ignored", "train.py", "    cache = data.prepare(cfg.data, cfg.size, cfg.cache_dir,",
     "    cache = data.prepare(cfg.data, cfg.size, None,", "tests/test_flags.py -k cache"),
    ("the checkpoint says crop on whatever --crop", "inference.py", '"crop": cfg["crop"] == "on",', '"crop": True,',
     "tests/test_flags.py -k crop"),
    # metrics, post-processing, figures, the epoch order, the run folder, predict (reviewer's picks)
    ('Dice without the factor 2', 'metrics.py',
     '2 * inter / (pred + true).clamp_min(1)',
     'inter / (pred + true).clamp_min(1)', 'tests/test_metrics.py'),
    ('IoU as intersection over the sum', 'metrics.py',
     'inter / (pred + true - inter).clamp_min(1)',
     'inter / (pred + true).clamp_min(1)', 'tests/test_metrics.py'),
    ('false-positive slices counted on tumour slices too', 'metrics.py',
     'int(((t == 0) & (p > 0)).sum())',
     'int((p > 0).sum())', 'tests/test_metrics.py tests/test_evaluation.py'),
    ('nanmean counts NaN as 0', 'metrics.py',
     '    arr = arr[~np.isnan(arr)]\n',
     '    arr = np.nan_to_num(arr)\n', 'tests/test_metrics.py tests/test_evaluation.py'),
    ('small components kept at exactly the minimum size dropped', 'metrics.py',
     'keep = stats[:, cv2.CC_STAT_AREA] >= min_size',
     'keep = stats[:, cv2.CC_STAT_AREA] > min_size', 'tests/test_metrics.py tests/test_evaluation.py'),
    ('the background kept as a component', 'metrics.py',
     '        keep[0] = False\n',
     '', 'tests/test_metrics.py tests/test_evaluation.py'),
    ('post-processing thresholds with > instead of >=', 'inference.py',
     'remove_small_components(probs >= threshold,',
     'remove_small_components(probs > threshold,', 'tests/test_evaluation.py -k equal_to_it'),
    ('the worst slices are the best ones', 'figures.py',
     'key=lambda r: r["dice"])[:n]',
     'key=lambda r: -r["dice"])[:n]', 'tests/test_figures.py'),
    ('every epoch the same order', 'feed.py',
     'manual_seed(rng_seed(seed, epoch))',
     'manual_seed(rng_seed(seed))', 'tests/test_batches.py'),
    ('intensity shift paints the background', 'feed.py',
     'x = torch.where(x != 0, x * scale + shift, x)',
     'x = x * scale + shift', 'tests/test_batches.py tests/test_data.py'),
    ('metrics.json names the last epoch as the one tested', 'train.py',
     '"best_epoch": kept,',
     '"best_epoch": len(log),', 'tests/test_train.py'),
    ('early stopping never resets its count', 'train.py',
     '0 if improved else progress.stale + 1',
     'progress.stale + 1', 'tests/test_train.py'),
    ("--overwrite on keeps the old run's files", 'train.py',
     '            (run.out / name).unlink()\n',
     '            pass\n', 'tests/test_flags.py -k overwrite'),
    ("predict ignores the checkpoint's crop", 'inference.py',
     'keep, images, box = data.preprocess_volume(image, self.size, self.crop)',
     'keep, images, box = data.preprocess_volume(image, self.size, True)', 'tests/test_predict.py -k checkpoints_crop'),
    ("Dice counts per sample mixed up with the batch's", 'metrics.py',
     'p = pred.reshape(pred.shape[0], -1).bool()',
     'p = pred.reshape(1, -1).expand(pred.shape[0], -1).bool()', 'tests/test_metrics.py'),
    # data: half-built caches, non-finite voxels, one-hot masks, preprocessing geometry (tests/test_data_faults.py)
    ("a cache folder with volume files but no meta.json taken as finished", "data.py",
     'meta = json.loads((folder / "meta.json").read_text())',
     'meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").exists() else {"volumes": []}',
     "tests/test_data_faults.py -k meta_json"),
    ("a truncated meta.json crashes prepare instead of a rebuild", "data.py",
     "    except (OSError, ValueError, KeyError, TypeError):\n        return None",
     "    except (OSError, KeyError, TypeError):\n        return None", "tests/test_data_faults.py -k truncated_meta"),
    ("a cache missing a volume's file taken as finished", "data.py",
     '    if not all((folder / f"{part}_{vid}.npy").is_file()', '    if False and not all((folder / f"{part}_{vid}.npy").is_file()',
     "tests/test_data_faults.py -k missing_a_volume"),
    ("meta.json written in place, not atomically", "data.py",
     'with atomic_path(folder / "meta.json") as tmp:\n        tmp.write_text(json.dumps(meta))',
     'if True:\n        (folder / "meta.json").write_text(json.dumps(meta))', "tests/test_data_faults.py -k full_disk"),
    ("atomic_path renames a failed write into place", "data.py",
     "        yield tmp\n        os.replace(tmp, path)\n    finally:\n        tmp.unlink(missing_ok=True)",
     "        yield tmp\n    finally:\n        if tmp.exists():\n            os.replace(tmp, path)", "tests/test_data_faults.py -k atomic_path"),
    ("a half-written synthetic folder taken as complete", "data.py", "    if done.exists():\n        return folder",
     "    if data.is_dir():\n        return folder", "tests/test_data_faults.py -k synthetic_source"),
    ("+inf voxels accepted", "data.py",
     "if not (np.isfinite(background).all() and np.isfinite(per_slice.max(-1)).all()):",
     "if not np.isfinite(background).all():", "tests/test_data_faults.py -k non_finite"),
    ("-inf voxels accepted", "data.py",
     "if not (np.isfinite(background).all() and np.isfinite(per_slice.max(-1)).all()):",
     "if not np.isfinite(per_slice.max(-1)).all():", "tests/test_data_faults.py -k non_finite"),
    ("NaN voxels accepted", "data.py",
     "if not (np.isfinite(background).all() and np.isfinite(per_slice.max(-1)).all()):",
     "if np.isinf(background).any() or np.isinf(per_slice.max(-1)).any():", "tests/test_data_faults.py -k non_finite"),
    ("two labels on one voxel accepted", "data.py",
     "valid = mask.max(initial=0) <= 1 and not (label & (label - 1)).any()", "valid = mask.max(initial=0) <= 1",
     "tests/test_data_faults.py -k two_labels"),
    ("one-hot mask values above 1 accepted", "data.py",
     "valid = mask.max(initial=0) <= 1 and not (label & (label - 1)).any()", "valid = not (label & (label - 1)).any()",
     "tests/test_data_faults.py -k two_labels"),
    ("one-hot channels of labels 2 and 4 swapped", "data.py",
     "label = mask[..., 0] | (mask[..., 1] << 1) | (mask[..., 2] << 2)",
     "label = mask[..., 0] | (mask[..., 2] << 1) | (mask[..., 1] << 2)", "tests/test_data_faults.py -k one_hot"),
    ("percentile clip at 1-99", "data.py", "np.percentile(v, (0.5, 99.5))", "np.percentile(v, (1, 99))",
     "tests/test_data_faults.py -k float64_reference"),
    ("percentile clip at 0.5-99.9", "data.py", "np.percentile(v, (0.5, 99.5))", "np.percentile(v, (0.5, 99.9))",
     "tests/test_data_faults.py -k float64_reference"),
    ("percentile clip only at the top", "data.py", "np.clip(v, lo, hi, out=v)", "np.clip(v, None, hi, out=v)",
     "tests/test_data_faults.py -k float64_reference"),
    ("z-score with the sample std (ddof=1)", "data.py", "v /= max(float(v.std()), 1e-6)",
     "v /= max(float(v.std(ddof=1)), 1e-6)", "tests/test_data_faults.py -k float64_reference"),
    ("background moved to 0 per volume, not per slice", "data.py", "per_slice -= background",
     "per_slice -= background.min(1, keepdims=True)", "tests/test_data_faults.py -k float64_reference"),
    ("brain = every modality above background", "data.py", "brain = (x > 0).any(0)", "brain = (x > 0).all(0)",
     "tests/test_data_faults.py -k float64_reference"),
    ("CROP_MARGIN 6 instead of 4", "data.py", "CROP_MARGIN = 4", "CROP_MARGIN = 6", "tests/test_data_faults.py -k brain_box"),
    ("box side one voxel short", "data.py", "max(xs[-1] - xs[0], ys[-1] - ys[0]) + 1 + 2 * margin",
     "max(xs[-1] - xs[0], ys[-1] - ys[0]) + 2 * margin", "tests/test_data_faults.py -k brain_box"),
    ("box centred rounding up", "data.py", "x0 = int(np.clip((xs[0] + xs[-1] + 1 - side) // 2",
     "x0 = int(np.clip((xs[0] + xs[-1] + 2 - side) // 2", "tests/test_data_faults.py -k brain_box"),
    ("box not clipped at the frame's far edge", "data.py",
     "y0 = int(np.clip((ys[0] + ys[-1] + 1 - side) // 2, 0, frame - side))",
     "y0 = int(max((ys[0] + ys[-1] + 1 - side) // 2, 0))", "tests/test_data_faults.py -k brain_box"),
    ("box rows and columns swapped", "data.py",
     "xs, ys = np.flatnonzero(brain.any((0, 2))), np.flatnonzero(brain.any((0, 1)))",
     "ys, xs = np.flatnonzero(brain.any((0, 2))), np.flatnonzero(brain.any((0, 1)))", "tests/test_data_faults.py -k brain_box"),
    ("uncrop resizes with align_corners=True (half-pixel shift)", "data.py", 'mode="bilinear", align_corners=False',
     'mode="bilinear", align_corners=True', "tests/test_data_faults.py -k uncrop"),
    ("uncrop resizes by nearest", "data.py", 'size=(side, side), mode="bilinear", align_corners=False)',
     'size=(side, side), mode="nearest")', "tests/test_data_faults.py -k uncrop"),
    ("uncrop pastes one row low", "data.py", "out[:, x0:x0 + side, y0:y0 + side] = values",
     "out[:, x0 + 1:x0 + side + 1, y0:y0 + side] = values", "tests/test_data_faults.py -k uncrop"),
    ("images resized bilinear, not by area", "data.py", "interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA",
     "interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR", "tests/test_data_faults.py -k area"),
    ("preprocessing resizes the whole frame, not the box", "data.py",
     "images = resize_slices(crop(norm[keep], box), size, nearest=False)",
     "images = resize_slices(norm[keep], size, nearest=False)", "tests/test_data_faults.py -k preprocess_crops"),
    # predict: one unreadable case
    ("one unreadable case aborts the predict run", "predict.py", "            failed += 1\n", "            raise\n",
     "tests/test_data_faults.py -k truncated_nifti"),
    ("predict exits 0 when a case failed", "predict.py", "return 1 if main(args) else 0", "return 0 * main(args)",
     "tests/test_data_faults.py -k truncated_nifti"),
    ("nibabel's EOFError escapes load_nifti", "data.py",
     'except Exception as e:\n        raise DataError(f"cannot read {path}',
     'except OSError as e:\n        raise DataError(f"cannot read {path}', "tests/test_data_faults.py -k truncated_nifti"),
    ("predict's failed-case line goes to stdout", "predict.py",
     'tqdm.write(f"predict.py: error: case {name} failed: {msg}", file=sys.stderr)',
     'tqdm.write(f"predict.py: error: case {name} failed: {msg}", file=sys.stdout)', "tests/test_data_faults.py -k truncated_nifti"),
    # bench/throughput.py (gpu.sh step b)
    ("the seed baseline reads the slice itself as its lower neighbour", "bench/throughput.py",
     "for z in range(k - self.context, k)]", "for z in range(k - self.context + 1, k + 1)]",
     "tests/test_gpu_sh.py -k neighbours"),
    # bench/cpu_speed.py
    ("cpu_speed's compiled rows time an uncompiled evaluation", "bench/cpu_speed.py",
     "eval_model = torch.compile(model) if speed.compile else model", "eval_model = model",
     "tests/test_train.py -k cpu_speed"),
    ("cpu_speed ignores --compile", "bench/cpu_speed.py",
     'compile=compile, device="cpu")\n    speed = inference.resolve_speed(device, amp, channels_last, compile)',
     'compile=compile, device="cpu")\n    speed = inference.resolve_speed(device, amp, channels_last, "off")',
     "tests/test_train.py -k cpu_speed"),
    ("cpu_speed's first calls not timed", "bench/cpu_speed.py", "calls.append(time.perf_counter() - t)",
     "calls.append(-1.0)", "tests/test_train.py -k cpu_speed"),
]


def run_mutant(name: str, file: str, old, new, tests: str, work: Path) -> str:
    """Apply the mutant to a fresh copy of the code, run its tests; CAUGHT when they fail."""
    for p in ROOT.iterdir():
        if p.suffix == ".py":
            shutil.copy(p, work / p.name)
    for folder in ("tests", "bench"):
        shutil.rmtree(work / folder, ignore_errors=True)
        shutil.copytree(ROOT / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    text = (work / file).read_text()
    for o, n in (old if isinstance(old, list) else [(old, new)]):
        if o not in text:
            return "STALE (the text to replace is gone)"
        text = text.replace(o, n)
    (work / file).write_text(text)
    # the real sample lives beside the repository: point the copy's conftest at it
    conftest = work / "tests" / "conftest.py"
    conftest.write_text(conftest.read_text().replace('ROOT.parent / "shared"', f'Path({str(ROOT.parent)!r}) / "shared"'))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests.split()],
                          cwd=work, capture_output=True, text=True)
    failed = [line.split(" - ")[0].removeprefix("FAILED ") for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    return f"CAUGHT by {failed[0] if failed else 'an error'}" if proc.returncode else "MISSED"


def main(words: list[str]) -> int:
    chosen = [m for m in MUTANTS if not words or any(w in m[0] for w in words)]
    missed = 0
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        for name, file, old, new, tests in chosen:
            t = time.perf_counter()
            verdict = run_mutant(name, file, old, new, tests, Path(tmp))
            missed += not verdict.startswith("CAUGHT")
            print(f"{verdict:<90} {name} ({file}, {time.perf_counter() - t:.0f} s)", flush=True)
    print(f"{len(chosen) - missed} of {len(chosen)} mutants caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""student_trainer: students trained against teacher targets, with no teacher in the process.

Import what you need from the submodules (nothing heavy happens at package import):

- `student_trainer.config`: the frozen run config (`TrainRunConfig`, `build_run_config`).
- `student_trainer.sources`: where targets come from (`StoreSource` offline by default,
  `RemoteSource`, `ReadThroughSource`, `InProcessTeacherSource` as a baseline only).
- `student_trainer.data`: stored views rendered as recorded, hash-checked, with their targets.
- `student_trainer.distill`: the student plus its distillation modules and loss terms.
- `student_trainer.train`: the training loop (`train_student`), checkpoints, resume, COCO AP.
- `student_trainer.ray_train`: data-parallel training with Ray Train (`train_with_ray`).
- `student_trainer.losses`: the LD, BCD, FGD and HGD losses and their released recipes.
- `student_trainer.cli`: ``distill train``.

This package never imports `teacher_service`: a remote teacher is reached over HTTP only.
"""

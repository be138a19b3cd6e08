"""The host pipelines: how a source's encoded images become pretraining
steps (two random-resized crops per image), labelled steps (one crop per
image, with its label), the labelled evaluation stream and labelled arrays
(centre crops), named by the library that runs them, each with its
per-image operations named by the library that decodes:

  grain        grain, no TensorFlow (`data_loader='grain'`, the default);
               per image: `pillow_ops` (Pillow + numpy)
  tfdata       tf.data (`data_loader='tf'`; imports TensorFlow);
               per image: `tf_ops` (TensorFlow ops)

and what both share: `crop_rule` (torchvision's RandomResizedCrop box rule
on the host, in numpy) and `undecodable` (the error, the skip log and the
gap fill for images that cannot be decoded).

Each pipeline has one `two_crop_batches`, one `labelled_batches`, one
`eval_batches` and one `center_crops`, taking what a source provides
(`grain`: random-access encoded images, labelled ones for the labelled
streams; `tfdata`: file paths and labels, or a tensorflow-datasets split).
Nothing here imports a source; the pipelines are imported only when a
source decodes through them, so a run on the in-memory arrays imports
neither, and the grain path never TensorFlow.
"""

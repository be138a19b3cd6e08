"""The data sources, one module per kind of data, each named by what it reads
and each with an `open_source(spec)` returning a `moco_jax.data.Source`:

  arrays        in-memory arrays: scikit-learn's digits, the CIFAR-10 mosaics
  image_folder  a folder of image files, data_dir/<split>/<class>/*.jpg|png
  tfds          a tensorflow-datasets dataset, by name

A source says what is read (a file list, a split's records, arrays), how
many examples and which labels; it hands the encoded images to a host
pipeline (`moco_jax.data.pipelines`), which decodes and crops them, for
pretraining and for the labelled streams alike (the in-memory arrays are
indexed directly). Each
module is imported only when its dataset is opened (`moco_jax.data.SOURCES`).
"""

//! Hostile and inconsistent files: every one is a typed error naming the file (and the
//! tensor, where there is one), never a panic.

mod common;

use std::io::Write;
use std::path::Path;

use common::{tensor_u16, write, Logical, TempDir};
use fastmoe_load_core::{detect, Checkpoint, Error};

/// A safetensors file from a raw header and a data section.
fn raw(path: &Path, header: &str, data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(7u8, data_len));
    std::fs::write(path, bytes).unwrap();
}

fn open_err(path: &Path) -> (Error, String) {
    let err = Checkpoint::open(path).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()) || msg.contains("index"),
        "{msg}"
    );
    (err, msg)
}

#[test]
fn valid_file_lists_tensors_in_file_order() {
    let dir = TempDir::new("ok");
    let path = dir.path().join("m.safetensors");
    write(
        &path,
        &[tensor_u16("b", &[2, 3], 0..6), tensor_u16("a", &[4], 0..4)],
    );
    let ckpt = Checkpoint::open(&path).unwrap();
    let names: Vec<&str> = ckpt.entries().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 2);
    let (_, a) = ckpt.tensor("a").unwrap();
    assert_eq!(a.shape, vec![4]);
    assert_eq!(a.end - a.start, 8);
    assert!(ckpt.config().is_none());
    assert!(matches!(
        ckpt.tensor("zzz"),
        Err(Error::TensorNotFound { .. })
    ));
}

#[test]
fn corrupt_headers() {
    let dir = TempDir::new("hdr");
    let ok = r#"{"t":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]}}"#;
    type MakeFile = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, MakeFile, &str)> = vec![
        (
            "short",
            Box::new(|p| std::fs::write(p, b"\x02\0\0").unwrap()),
            "too short",
        ),
        (
            "truncated_data",
            Box::new(move |p| raw(p, ok, 5)),
            "truncated",
        ),
        (
            "trailing_data",
            Box::new(move |p| raw(p, ok, 9)),
            "describes 8 bytes",
        ),
        (
            "huge_len",
            Box::new(|p| {
                let mut b = u64::MAX.to_le_bytes().to_vec();
                b.extend_from_slice(b"{}");
                std::fs::write(p, b).unwrap()
            }),
            "claims",
        ),
        (
            "len_past_end",
            Box::new(|p| {
                let mut b = 1000u64.to_le_bytes().to_vec();
                b.extend_from_slice(b"{}   ");
                std::fs::write(p, b).unwrap()
            }),
            "claims 1000 bytes",
        ),
        (
            "not_utf8",
            Box::new(|p| {
                let mut b = 4u64.to_le_bytes().to_vec();
                b.extend_from_slice(&[0xff, 0xfe, 0xfd, 0xfc]);
                std::fs::write(p, b).unwrap()
            }),
            "UTF-8",
        ),
        (
            "not_json",
            Box::new(|p| raw(p, "{not json", 0)),
            "not a JSON",
        ),
        (
            "unknown_dtype",
            Box::new(|p| {
                raw(
                    p,
                    r#"{"t":{"dtype":"BF17","shape":[1],"data_offsets":[0,2]}}"#,
                    2,
                )
            }),
            "`t`",
        ),
        (
            "size_mismatch",
            Box::new(|p| {
                raw(
                    p,
                    r#"{"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,8]}}"#,
                    8,
                )
            }),
            "tensor `t`: F32 [2, 2] needs 16 bytes",
        ),
        (
            "overflow",
            Box::new(|p| {
                raw(
                    p,
                    r#"{"t":{"dtype":"F32","shape":[18446744073709551615,4],"data_offsets":[0,8]}}"#,
                    8,
                )
            }),
            "overflows",
        ),
        (
            "overlap",
            Box::new(|p| {
                raw(
                    p,
                    r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
                    6,
                )
            }),
            "data_offsets",
        ),
        (
            "gap",
            Box::new(|p| {
                raw(
                    p,
                    r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[6,10]}}"#,
                    10,
                )
            }),
            "data_offsets",
        ),
        (
            "reversed",
            Box::new(|p| {
                raw(
                    p,
                    r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}"#,
                    4,
                )
            }),
            "data_offsets",
        ),
    ];
    for (name, make, expected) in cases {
        let path = dir.path().join(format!("{name}.safetensors"));
        make(&path);
        let (err, msg) = open_err(&path);
        assert!(matches!(err, Error::Header { .. }), "{name}: {err:?}");
        assert!(msg.contains(expected), "{name}: {msg}");
    }
}

/// Files of other kinds passed as the checkpoint (under their own or a `.safetensors` name)
/// are named for what they are, not taken for a safetensors file with a huge header.
#[test]
fn other_files_are_not_safetensors() {
    let dir = TempDir::new("other");
    let config = r#"{
  "architectures": ["Qwen3MoeForCausalLM"],
  "model_type": "qwen3_moe"
}"#;
    // Minified, with `{` as the ninth byte: its first eight bytes are still text.
    let minified = r#"{"abcd":{"model_type": "x"}}"#;
    let index = r#"{"metadata": {"total_size": 8}, "weight_map": {"x": "a.safetensors"}}"#;
    let mut pickle = vec![0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9];
    pickle.extend_from_slice(&[0x20; 40]);
    let mut zip = b"PK\x03\x04\x00\x00\x08\x08\x00\x00".to_vec();
    zip.extend_from_slice(&[0xa1; 40]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("config.json", config.into(), "JSON (a config.json?)"),
        ("renamed.safetensors", config.into(), "JSON"),
        ("minified.safetensors", minified.into(), "JSON"),
        (
            "model.safetensors.index.json",
            index.into(),
            "pass the directory",
        ),
        ("pytorch_model.safetensors", zip, "zip archive"),
        ("pytorch_model.bin", pickle, "Python pickle"),
        (
            "model.gguf",
            b"GGUF\x03\x00\x00\x00\x10\x00\x00\x00".to_vec(),
            "GGUF",
        ),
        (
            "notes.safetensors",
            b"just some notes, not weights".to_vec(),
            "something else",
        ),
    ];
    for (name, bytes, expected) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let (err, msg) = open_err(&path);
        assert!(matches!(err, Error::Checkpoint { .. }), "{name}: {err:?}");
        assert!(msg.contains("not a safetensors file"), "{name}: {msg}");
        assert!(msg.contains(expected), "{name}: {msg}");
        assert!(!msg.contains("truncated"), "{name}: {msg}");
    }
}

#[test]
fn directories_and_indexes() {
    let dir = TempDir::new("dir");
    let d = dir.path();
    // No shards at all.
    assert!(open_err(d).1.contains("no model.safetensors.index.json"));
    // Shards without an index are all read.
    write(&d.join("b.safetensors"), &[tensor_u16("x", &[2], 0..2)]);
    write(&d.join("a.safetensors"), &[tensor_u16("y", &[2], 0..2)]);
    let ckpt = Checkpoint::open(d).unwrap();
    assert_eq!(ckpt.shards().len(), 2);
    assert!(ckpt.contains("x") && ckpt.contains("y"));
    // A tensor stored twice.
    write(&d.join("c.safetensors"), &[tensor_u16("x", &[2], 0..2)]);
    assert!(open_err(d).1.contains("`x` is stored twice"));
    std::fs::remove_file(d.join("c.safetensors")).unwrap();

    let index = |map: &str| {
        std::fs::write(
            d.join("model.safetensors.index.json"),
            format!(r#"{{"metadata":{{}},"weight_map":{{{map}}}}}"#),
        )
        .unwrap()
    };
    index(r#""x":"b.safetensors","y":"a.safetensors""#);
    assert_eq!(Checkpoint::open(d).unwrap().shards().len(), 2);
    index(r#""x":"b.safetensors","y":"gone.safetensors""#);
    let (err, msg) = open_err(d);
    assert!(
        matches!(err, Error::Checkpoint { .. })
            && msg.contains("`gone.safetensors` (holding `y`) is missing"),
        "{msg}"
    );
    index(r#""x":"a.safetensors","y":"a.safetensors""#);
    assert!(open_err(d)
        .1
        .contains("`x` is listed in `a.safetensors`, which does not hold it"));
    index(r#""x":"../b.safetensors""#);
    assert!(open_err(d).1.contains("outside the checkpoint"));
    index(r#""x":"/etc/passwd""#);
    assert!(open_err(d).1.contains("outside the checkpoint"));
    std::fs::write(d.join("model.safetensors.index.json"), "{oops").unwrap();
    assert!(open_err(d).1.contains("not a safetensors index"));
    index(r#""x":"b.safetensors""#);
    // The index decides: only b is read, a is ignored.
    assert_eq!(Checkpoint::open(d).unwrap().shards().len(), 1);

    std::fs::write(d.join("config.json"), r#"{"model_type": "qwen3_moe"}"#).unwrap();
    assert_eq!(Checkpoint::open(d).unwrap().model_type(), Some("qwen3_moe"));
    std::fs::write(
        d.join("config.json"),
        r#"{"text_config": {"model_type": "llama4_text"}}"#,
    )
    .unwrap();
    assert_eq!(
        Checkpoint::open(d).unwrap().model_type(),
        Some("llama4_text")
    );
    std::fs::write(d.join("config.json"), "{").unwrap();
    assert!(open_err(d).1.contains("config.json: not valid JSON"));

    let missing = d.join("nope");
    assert!(matches!(Checkpoint::open(&missing), Err(Error::Io { .. })));
}

#[test]
fn layout_errors_name_the_tensors() {
    let dir = TempDir::new("layout");
    let l = Logical {
        experts: 3,
        hidden: 8,
        inter: 6,
    };
    let p = "model.layers.3.mlp.experts";
    let check = |tensors: Vec<common::Tensor>, expected: &str| {
        let path = dir.path().join("m.safetensors");
        write(&path, &tensors);
        let ckpt = Checkpoint::open(&path).unwrap();
        let err = detect(&ckpt, None).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, Error::Layout { .. }) && msg.contains(expected) && msg.contains(p),
            "{msg}"
        );
    };
    let mut fused = l.fused(p, false, false, false);
    fused.pop();
    check(
        fused,
        "has no companion `model.layers.3.mlp.experts.down_proj`",
    );

    let mut fused = l.fused(p, false, false, false);
    fused[1] = tensor_u16(
        &format!("{p}.down_proj"),
        &[3, 8, 5],
        std::iter::repeat_n(0, 120),
    );
    check(fused, "cannot tell the orientation");

    let mut fused = l.fused(p, false, false, true);
    fused.pop();
    check(fused, "only one of");

    let mut experts = l.per_expert(p, ["gate_proj", "up_proj", "down_proj"], false);
    experts.retain(|t| !t.name.contains(".1."));
    check(experts, "expert 1 is missing");

    let mut experts = l.per_expert(p, ["w1", "w3", "w2"], false);
    experts.retain(|t| !t.name.ends_with(".2.w3.weight"));
    check(
        experts,
        "`model.layers.3.mlp.experts.2.w3.weight` is missing",
    );

    let mut experts = l.per_expert(p, ["w1", "w3", "w2"], false);
    experts[4] = tensor_u16(
        &format!("{p}.1.w3.weight"),
        &[6, 7],
        std::iter::repeat_n(0, 42),
    );
    check(
        experts,
        "`model.layers.3.mlp.experts.1.w3.weight` has shape [6, 7]",
    );

    let mut experts = l.per_expert(p, ["w1", "w3", "w2"], false);
    experts[5].dtype = safetensors::Dtype::F16;
    check(experts, "mixes dtypes");
}

#[test]
fn detection_finds_every_group_and_skips_shared_experts() {
    let dir = TempDir::new("detect");
    let l = Logical {
        experts: 2,
        hidden: 4,
        inter: 4,
    };
    let mut tensors = Vec::new();
    for layer in [10, 2] {
        tensors.extend(l.fused(
            &format!("model.layers.{layer}.mlp.experts"),
            false,
            false,
            false,
        ));
    }
    tensors.extend(l.per_expert(
        "model.layers.1.block_sparse_moe.experts",
        ["w1", "w3", "w2"],
        false,
    ));
    // Shared experts, dense MLPs and a 2-D fused MLP are not routed experts.
    tensors.extend(l.per_expert(
        "model.layers.1.mlp.shared_experts",
        ["gate_proj", "up_proj", "down_proj"],
        false,
    ));
    tensors.push(tensor_u16(
        "model.layers.0.mlp.gate_proj.weight",
        &[4, 4],
        0..16,
    ));
    tensors.push(tensor_u16(
        "model.layers.0.mlp.gate_up_proj.weight",
        &[8, 4],
        0..32,
    ));
    // GraniteMoe's pre-v5 names.
    let mut granite = l.fused("model.layers.5.block_sparse_moe", false, false, false);
    granite[0].name = "model.layers.5.block_sparse_moe.input_linear.weight".into();
    granite[1].name = "model.layers.5.block_sparse_moe.output_linear.weight".into();
    tensors.extend(granite);
    let path = dir.path().join("m.safetensors");
    write(&path, &tensors);
    let ckpt = Checkpoint::open(&path).unwrap();
    let found: Vec<(String, &str)> = detect(&ckpt, None)
        .unwrap()
        .into_iter()
        .map(|l| (l.prefix.clone(), l.format()))
        .collect();
    assert_eq!(
        found,
        [
            (
                "model.layers.1.block_sparse_moe.experts".to_string(),
                "per_expert"
            ),
            ("model.layers.2.mlp.experts".to_string(), "fused"),
            ("model.layers.5.block_sparse_moe".to_string(), "fused"),
            ("model.layers.10.mlp.experts".to_string(), "fused"),
        ]
    );
}

#[test]
fn changes_after_open_are_detected() {
    let dir = TempDir::new("changed");
    let path = dir.path().join("m.safetensors");
    let l = Logical {
        experts: 2,
        hidden: 4,
        inter: 4,
    };
    write(&path, &l.fused("e", false, false, false));
    let ckpt = Checkpoint::open(&path).unwrap();
    ckpt.check_intact([0]).unwrap();

    // Appending changes the size.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(b"x").unwrap();
    let err = ckpt.check_intact([0]).unwrap_err();
    assert!(
        matches!(err, Error::FileChanged { .. }) && err.to_string().contains("size was"),
        "{err}"
    );

    // Replacing the file by a new one with the same size.
    write(&path, &l.fused("e", false, false, false));
    let ckpt = Checkpoint::open(&path).unwrap();
    let tmp = dir.path().join("new");
    write(&tmp, &l.fused("e", false, false, false));
    std::fs::rename(&tmp, &path).unwrap();
    let err = ckpt.check_intact([0]).unwrap_err();
    assert!(err.to_string().contains("replaced"), "{err}");

    let ckpt = Checkpoint::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(ckpt
        .check_intact([0])
        .unwrap_err()
        .to_string()
        .contains("deleted"));
}

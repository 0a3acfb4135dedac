//! A small, model-agnostic ONNX graph builder.
//!
//! It hands out unique value and node names, collects nodes, graph inputs/outputs with symbolic
//! dimensions and initializers, and produces a `ModelProto` (IR 8, default-domain opset 17, plus an
//! opset import for every other domain a node was added in, such as ONNX Runtime's contrib ops). With
//! external data on, every initializer of at least [`EXTERNAL_DATA_THRESHOLD`] bytes is streamed
//! straight into the data file at a 64-byte aligned offset as it is added, so a large model's
//! weights are never held in memory twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::ExportError;
use super::onnx_proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto, tensor_proto,
    tensor_shape_proto, type_proto,
};

/// ONNX IR version of the written model (what onnx 1.10+ and every ORT since 1.10 load).
pub const IR_VERSION: i64 = 8;
/// Version of the default (`ai.onnx`) operator set the graph uses.
pub const OPSET_VERSION: i64 = 17;
/// Initializers of at least this many bytes go to the external data file when it is enabled.
pub const EXTERNAL_DATA_THRESHOLD: usize = 1024;
/// Alignment of each tensor inside the external data file (lets runtimes mmap tensors directly).
pub const EXTERNAL_DATA_ALIGNMENT: u64 = 64;

/// An operator set other than the default `ai.onnx` one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpsetId {
    pub domain: &'static str,
    pub version: i64,
}

/// ONNX Runtime's contrib operators (`GroupQueryAttention`, ...), version 1 as ONNX Runtime registers them.
pub const MICROSOFT_OPSET: OpsetId = OpsetId { domain: "com.microsoft", version: 1 };

/// Element type of a graph value or initializer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemType {
    F32,
    I64,
    Bool,
}

impl ElemType {
    fn proto(self) -> i32 {
        let dt = match self {
            ElemType::F32 => tensor_proto::DataType::Float,
            ElemType::I64 => tensor_proto::DataType::Int64,
            ElemType::Bool => tensor_proto::DataType::Bool,
        };
        dt as i32
    }
}

/// One dimension of a graph input or output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    /// A size known when the graph is built.
    Fixed(i64),
    /// A size named by a `dim_param`, bound by the runtime (for example `batch_size`).
    Symbolic(&'static str),
}

/// Where the external data of a model went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalDataSummary {
    /// The data file.
    pub path: PathBuf,
    /// Its size in bytes, padding included.
    pub bytes: u64,
    /// How many initializers it holds.
    pub tensors: usize,
}

/// A finished model: the protobuf plus, when external data was used, where its weights went.
#[derive(Debug)]
pub struct BuiltModel {
    pub model: ModelProto,
    pub external: Option<ExternalDataSummary>,
}

/// Streams initializer bytes into the external data file.
struct ExternalDataWriter {
    file: BufWriter<File>,
    path: PathBuf,
    /// File name recorded in each tensor's `location` (relative to the model file).
    location: String,
    offset: u64,
    tensors: usize,
}

impl ExternalDataWriter {
    fn io_err(&self, source: std::io::Error) -> ExportError {
        ExportError::Io { path: self.path.clone(), source }
    }

    /// Pads to the next aligned offset, writes the bytes `write` produces and returns
    /// `(offset, length)` of the tensor.
    fn append(
        &mut self,
        write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<u64>,
    ) -> Result<(u64, u64), ExportError> {
        let pad = (EXTERNAL_DATA_ALIGNMENT - self.offset % EXTERNAL_DATA_ALIGNMENT) % EXTERNAL_DATA_ALIGNMENT;
        if pad > 0 {
            let zeros = [0u8; EXTERNAL_DATA_ALIGNMENT as usize];
            self.file.write_all(&zeros[..pad as usize]).map_err(|e| self.io_err(e))?;
            self.offset += pad;
        }
        let start = self.offset;
        let length = write(&mut self.file).map_err(|e| self.io_err(e))?;
        self.offset += length;
        self.tensors += 1;
        Ok((start, length))
    }

    fn finish(self) -> Result<ExternalDataSummary, ExportError> {
        let Self { file, path, offset, tensors, .. } = self;
        let file =
            file.into_inner().map_err(|e| ExportError::Io { path: path.clone(), source: e.into_error() })?;
        file.sync_all().map_err(|source| ExportError::Io { path: path.clone(), source })?;
        Ok(ExternalDataSummary { path, bytes: offset, tensors })
    }
}

/// The raw little-endian bytes of an initializer, before they are placed.
enum RawData<'a> {
    F32(&'a [f32]),
    I64(&'a [i64]),
}

impl RawData<'_> {
    fn byte_len(&self) -> usize {
        match self {
            RawData::F32(v) => v.len() * 4,
            RawData::I64(v) => v.len() * 8,
        }
    }

    fn to_vec(&self) -> Vec<u8> {
        match self {
            RawData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            RawData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    /// Writes the bytes in bounded chunks, so no full byte copy of a large tensor is made.
    fn write_to(&self, out: &mut impl Write) -> std::io::Result<u64> {
        const CHUNK: usize = 16 * 1024;
        let mut buf = Vec::with_capacity(CHUNK * 8);
        match self {
            RawData::F32(v) => {
                for chunk in v.chunks(CHUNK) {
                    buf.clear();
                    buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
                    out.write_all(&buf)?;
                }
            }
            RawData::I64(v) => {
                for chunk in v.chunks(CHUNK) {
                    buf.clear();
                    buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
                    out.write_all(&buf)?;
                }
            }
        }
        Ok(self.byte_len() as u64)
    }
}

/// Key under which small constants are shared: element type, dims and bytes.
type ConstKey = (i32, Vec<i64>, Vec<u8>);

/// Hands out unique names within one namespace: `base`, then `base_1`, `base_2`, ...
#[derive(Default)]
struct Namer {
    used: HashSet<String>,
    next_suffix: HashMap<String, usize>,
}

impl Namer {
    fn fresh(&mut self, base: &str) -> String {
        if self.used.insert(base.to_string()) {
            return base.to_string();
        }
        let suffix = self.next_suffix.entry(base.to_string()).or_insert(1);
        loop {
            let candidate = format!("{base}_{suffix}");
            *suffix += 1;
            if self.used.insert(candidate.clone()) {
                return candidate;
            }
        }
    }

    /// Claims an exact name; `false` when it is taken.
    fn claim(&mut self, name: &str) -> bool {
        self.used.insert(name.to_string())
    }
}

/// Builds one ONNX graph; see the module docs.
pub struct GraphBuilder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    value_names: Namer,
    node_names: Namer,
    constants: HashMap<ConstKey, String>,
    /// Versions of the non-default domains nodes were added in, for the opset imports.
    domains: BTreeMap<&'static str, i64>,
    scope: String,
    external: Option<ExternalDataWriter>,
}

impl std::fmt::Debug for GraphBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphBuilder")
            .field("nodes", &self.nodes.len())
            .field("initializers", &self.initializers.len())
            .field("external", &self.external.as_ref().map(|e| &e.path))
            .finish()
    }
}

impl GraphBuilder {
    /// A builder that keeps every initializer inside the model protobuf.
    pub fn new() -> Self {
        Self {
            nodes: Vec::new(),
            initializers: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            value_names: Namer::default(),
            node_names: Namer::default(),
            constants: HashMap::new(),
            domains: BTreeMap::new(),
            scope: String::new(),
            external: None,
        }
    }

    /// A builder that streams initializers of at least [`EXTERNAL_DATA_THRESHOLD`] bytes into
    /// `data_path`; the tensors record the path's file name as their `location`, so the data file
    /// must sit next to the model file.
    pub fn with_external_data(data_path: &Path) -> Result<Self, ExportError> {
        let location = data_path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| ExportError::InvalidOptions(format!("{}: not a file name", data_path.display())))?
            .to_string();
        let file = File::create(data_path)
            .map_err(|source| ExportError::Io { path: data_path.to_path_buf(), source })?;
        let writer = ExternalDataWriter {
            file: BufWriter::with_capacity(1 << 20, file),
            path: data_path.to_path_buf(),
            location,
            offset: 0,
            tensors: 0,
        };
        Ok(Self { external: Some(writer), ..Self::new() })
    }

    /// Sets the prefix of the node names created from now on (for example `layers.3/attn`).
    pub fn set_scope(&mut self, scope: impl Into<String>) {
        self.scope = scope.into();
    }

    /// Reserves an exact value name; two values with the same name would make an invalid graph.
    fn reserve_exact(&mut self, name: &str) -> Result<(), ExportError> {
        if self.value_names.claim(name) { Ok(()) } else { Err(ExportError::DuplicateName(name.to_string())) }
    }

    fn scoped(&self, op_type: &str) -> String {
        if self.scope.is_empty() { op_type.to_string() } else { format!("{}/{op_type}", self.scope) }
    }

    fn value_info(name: &str, elem: ElemType, dims: &[Dim]) -> ValueInfoProto {
        let dim = dims
            .iter()
            .map(|d| tensor_shape_proto::Dimension {
                value: Some(match *d {
                    Dim::Fixed(v) => tensor_shape_proto::dimension::Value::DimValue(v),
                    Dim::Symbolic(p) => tensor_shape_proto::dimension::Value::DimParam(p.to_string()),
                }),
                denotation: String::new(),
            })
            .collect();
        let tensor = type_proto::Tensor { elem_type: elem.proto(), shape: Some(TensorShapeProto { dim }) };
        ValueInfoProto {
            name: name.to_string(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(tensor)),
                denotation: String::new(),
            }),
            doc_string: String::new(),
        }
    }

    /// Declares a graph input and returns its name.
    pub fn input(&mut self, name: &str, elem: ElemType, dims: &[Dim]) -> Result<String, ExportError> {
        self.reserve_exact(name)?;
        self.inputs.push(Self::value_info(name, elem, dims));
        Ok(name.to_string())
    }

    /// Declares a graph output; a node must produce `name` (see [`GraphBuilder::op_into`]).
    pub fn output(&mut self, name: &str, elem: ElemType, dims: &[Dim]) {
        self.outputs.push(Self::value_info(name, elem, dims));
    }

    fn push_node(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        outputs: Vec<String>,
    ) {
        self.push_node_in(None, op_type, inputs, attrs, outputs);
    }

    fn push_node_in(
        &mut self,
        opset: Option<OpsetId>,
        op_type: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        outputs: Vec<String>,
    ) {
        let name = self.node_names.fresh(&self.scoped(op_type));
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs,
            name,
            op_type: op_type.to_string(),
            domain: opset.map_or_else(String::new, |o| o.domain.to_string()),
            attribute: attrs,
            doc_string: String::new(),
        });
    }

    /// Adds a default-domain node with one output and returns the output's (fresh) name.
    pub fn op(&mut self, op_type: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.value_names.fresh(&format!("{}_out", self.scoped(op_type)));
        self.push_node(op_type, inputs, attrs, vec![out.clone()]);
        out
    }

    /// Adds a default-domain node whose single output gets the exact name `output`
    /// (a graph output, for example).
    pub fn op_into(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        output: &str,
    ) -> Result<String, ExportError> {
        self.reserve_exact(output)?;
        self.push_node(op_type, inputs, attrs, vec![output.to_string()]);
        Ok(output.to_string())
    }

    /// Adds a node of another operator set (recorded in the model's opset imports). Each entry of
    /// `outputs` is an exact name (a graph output, for example) or `None` for a fresh one; returns
    /// the output names in order.
    pub fn op_in(
        &mut self,
        opset: OpsetId,
        op_type: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        outputs: &[Option<&str>],
    ) -> Result<Vec<String>, ExportError> {
        let version = *self.domains.entry(opset.domain).or_insert(opset.version);
        if version != opset.version {
            return Err(ExportError::InvalidOptions(format!(
                "operator set {} is used at versions {version} and {}",
                opset.domain, opset.version
            )));
        }
        let mut names = Vec::with_capacity(outputs.len());
        for (i, output) in outputs.iter().enumerate() {
            match output {
                Some(exact) => {
                    self.reserve_exact(exact)?;
                    names.push(exact.to_string());
                }
                None => names.push(self.value_names.fresh(&format!("{}_out{i}", self.scoped(op_type)))),
            }
        }
        self.push_node_in(Some(opset), op_type, inputs, attrs, names.clone());
        Ok(names)
    }

    fn push_initializer(
        &mut self,
        name: String,
        dims: &[i64],
        elem: ElemType,
        data: RawData<'_>,
    ) -> Result<(), ExportError> {
        let mut tensor =
            TensorProto { name, dims: dims.to_vec(), data_type: elem.proto(), ..Default::default() };
        match &mut self.external {
            Some(ext) if data.byte_len() >= EXTERNAL_DATA_THRESHOLD => {
                let (offset, length) = ext.append(|w| data.write_to(w))?;
                let entry = |key: &str, value: String| StringStringEntryProto { key: key.to_string(), value };
                tensor.external_data = vec![
                    entry("location", ext.location.clone()),
                    entry("offset", offset.to_string()),
                    entry("length", length.to_string()),
                ];
                tensor.data_location = tensor_proto::DataLocation::External as i32;
            }
            _ => tensor.raw_data = data.to_vec(),
        }
        self.initializers.push(tensor);
        Ok(())
    }

    fn check_len(name: &str, dims: &[i64], len: usize) -> Result<(), ExportError> {
        let expected =
            dims.iter().try_fold(1usize, |acc, &d| usize::try_from(d).ok().and_then(|d| acc.checked_mul(d)));
        if expected == Some(len) {
            Ok(())
        } else {
            Err(ExportError::InitializerShape { name: name.to_string(), dims: dims.to_vec(), len })
        }
    }

    /// Adds an f32 initializer under the exact name `name` (weights keep their checkpoint names).
    pub fn weight_f32(&mut self, name: &str, dims: &[i64], data: &[f32]) -> Result<String, ExportError> {
        Self::check_len(name, dims, data.len())?;
        self.reserve_exact(name)?;
        self.push_initializer(name.to_string(), dims, ElemType::F32, RawData::F32(data))?;
        Ok(name.to_string())
    }

    fn constant(&mut self, elem: ElemType, dims: &[i64], data: RawData<'_>) -> Result<String, ExportError> {
        let key = (elem.proto(), dims.to_vec(), data.to_vec());
        if let Some(name) = self.constants.get(&key) {
            return Ok(name.clone());
        }
        let base = match elem {
            ElemType::F32 => "const_f32",
            ElemType::I64 => "const_i64",
            ElemType::Bool => "const_bool",
        };
        let name = self.value_names.fresh(base);
        self.push_initializer(name.clone(), dims, elem, data)?;
        self.constants.insert(key, name.clone());
        Ok(name)
    }

    /// A shared int64 constant initializer of shape `dims`.
    pub fn const_i64(&mut self, dims: &[i64], values: &[i64]) -> Result<String, ExportError> {
        Self::check_len("const_i64", dims, values.len())?;
        self.constant(ElemType::I64, dims, RawData::I64(values))
    }

    /// A shared f32 constant initializer of shape `dims`.
    pub fn const_f32(&mut self, dims: &[i64], values: &[f32]) -> Result<String, ExportError> {
        Self::check_len("const_f32", dims, values.len())?;
        self.constant(ElemType::F32, dims, RawData::F32(values))
    }

    /// A 1-D int64 constant (shapes, axes, slice bounds).
    pub fn ints(&mut self, values: &[i64]) -> Result<String, ExportError> {
        self.const_i64(&[values.len() as i64], values)
    }

    /// A 0-D int64 constant.
    pub fn scalar_i64(&mut self, value: i64) -> Result<String, ExportError> {
        self.const_i64(&[], &[value])
    }

    /// A 0-D f32 constant.
    pub fn scalar_f32(&mut self, value: f32) -> Result<String, ExportError> {
        self.const_f32(&[], &[value])
    }

    /// Finishes the graph: flushes the external data file and wraps everything in a `ModelProto`.
    pub fn finish(self, graph_name: &str, doc_string: &str) -> Result<BuiltModel, ExportError> {
        let external = self.external.map(ExternalDataWriter::finish).transpose()?;
        let graph = GraphProto {
            node: self.nodes,
            name: graph_name.to_string(),
            initializer: self.initializers,
            input: self.inputs,
            output: self.outputs,
            ..Default::default()
        };
        let default_opset = OperatorSetIdProto { domain: String::new(), version: OPSET_VERSION };
        let other_opsets = self
            .domains
            .iter()
            .map(|(&domain, &version)| OperatorSetIdProto { domain: domain.to_string(), version });
        let model = ModelProto {
            ir_version: IR_VERSION,
            opset_import: std::iter::once(default_opset).chain(other_opsets).collect(),
            producer_name: "tandem-train".to_string(),
            producer_version: env!("CARGO_PKG_VERSION").to_string(),
            doc_string: doc_string.to_string(),
            graph: Some(graph),
            ..Default::default()
        };
        Ok(BuiltModel { model, external })
    }
}

impl Default for GraphBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// An `int` attribute.
pub fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: attribute_proto::AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

/// An `ints` attribute.
pub fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: attribute_proto::AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..Default::default()
    }
}

/// A `float` attribute.
pub fn attr_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: attribute_proto::AttributeType::Float as i32,
        f: value,
        ..Default::default()
    }
}

/// A `tensor` attribute (for example the value of `ConstantOfShape`).
pub fn attr_tensor(name: &str, value: TensorProto) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: attribute_proto::AttributeType::Tensor as i32,
        t: Some(value),
        ..Default::default()
    }
}

/// A small inline f32 tensor, for tensor attributes.
pub fn inline_tensor_f32(dims: &[i64], values: &[f32]) -> TensorProto {
    TensorProto {
        dims: dims.to_vec(),
        data_type: ElemType::F32.proto(),
        raw_data: RawData::F32(values).to_vec(),
        ..Default::default()
    }
}

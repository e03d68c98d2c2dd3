export {
  DfsClient,
  DEFAULT_CHUNK_SIZE,
  MAX_CHUNK_SIZE,
  errorCode,
  type ClientOptions,
  type ObjectInfo,
  type OpenDownload,
  type RangeOptions,
  type Target,
  type UploadOptions,
  type UploadSource,
  type Version,
} from "./client.js";
export { Code, ConnectError } from "@connectrpc/connect";
export * as storagePb from "../gen/dfs/v1/storage_pb.js";
export * as clusterPb from "../gen/dfs/v1/cluster_pb.js";

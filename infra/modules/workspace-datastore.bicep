// The datastore each fine-tune job reads its train/test split through (TUNEDROP_AZUREML_DATASTORE):
// AzureBlob on the data account's finetune-data container, with no credentials (identity-based).
// Deployed into the workspace's resource group, for a created and an existing workspace alike.
//
// Which identity reads it: a v2 job that sets no identity, reading a credential-less datastore on an
// AmlCompute cluster, reads with the cluster's managed identity ("If the identity property is left
// unspecified and datastore doesn't have cached credentials, then compute managed identity becomes
// the fallback option": Microsoft's how-to-identity-based-service-authentication). The registry's
// chat_completion_pipeline is a pipeline component, for which an identity set on the outer job does
// not take effect. So the cluster's identity is the one granted Storage Blob Data Reader on the
// container (main.bicep), not the Function App's, which only writes the split.
@description('Name of the Azure ML workspace (in this deployment\'s resource group).')
param workspaceName string
@description('Datastore name (TUNEDROP_AZUREML_DATASTORE).')
param name string
@description('Name of the data storage account.')
param dataAccountName string
@description('Container holding the train/test splits (TUNEDROP_AZUREML_DATA_CONTAINER).')
param container string
@description('Subscription of the data account.')
param dataSubscriptionId string
@description('Resource group of the data account.')
param dataResourceGroup string

resource workspace 'Microsoft.MachineLearningServices/workspaces@2024-10-01' existing = {
  name: workspaceName
}

resource datastore 'Microsoft.MachineLearningServices/workspaces/datastores@2024-10-01' = {
  parent: workspace
  name: name
  properties: {
    datastoreType: 'AzureBlob'
    accountName: dataAccountName
    containerName: container
    endpoint: environment().suffixes.storage
    protocol: 'https'
    credentials: { credentialsType: 'None' }
    serviceDataAccessAuthIdentity: 'None'
    subscriptionId: dataSubscriptionId
    resourceGroup: dataResourceGroup
    description: 'tunedrop: each run\'s train/test split, written by the Function App and read by its fine-tune job with the compute cluster\'s identity.'
  }
}

output name string = datastore.name
